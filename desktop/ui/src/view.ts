// What the user is looking at, kept in the URL (`#/sales?range=1d&granularity=hour&channel=web`)
// so that every view can be bookmarked and shared.

export const PAGES = ["overview", "sales", "marketing", "behavior", "inventory", "fleet"] as const;
export type Page = (typeof PAGES)[number];

export const RANGES: Record<string, number> = {
  "15m": 15 * 60,
  "1h": 3600,
  "1d": 86_400,
  "7d": 7 * 86_400,
  "30d": 30 * 86_400,
};

export const MODELS = ["last_touch", "first_touch", "linear", "time_decay", "position_based"] as const;

export interface View {
  page: Page;
  /** A key of RANGES, or "custom" with `from` and `to`. */
  range: string;
  from?: string;
  to?: string;
  granularity: "minute" | "hour" | "day";
  /** Other parameters: filters (`channel=web`), `model`, `group_by`… */
  params: Record<string, string>;
}

export function defaultGranularity(range: string): View["granularity"] {
  if (range === "15m" || range === "1h") return "minute";
  if (range === "30d") return "day";
  return "hour";
}

export function parse(hash: string): View {
  const [path, query = ""] = hash.replace(/^#\/?/, "").split("?", 2);
  const page = (PAGES as readonly string[]).includes(path) ? (path as Page) : "overview";
  const q = new URLSearchParams(query);
  const range = q.get("range") ?? "1d";
  const gran = q.get("granularity");
  const view: View = {
    page,
    range: range in RANGES || range === "custom" ? range : "1d",
    granularity: gran === "minute" || gran === "hour" || gran === "day" ? gran : defaultGranularity(range),
    params: {},
  };
  if (view.range === "custom") {
    view.from = q.get("from") ?? undefined;
    view.to = q.get("to") ?? undefined;
  }
  for (const [k, v] of q) {
    if (!["range", "granularity", "from", "to"].includes(k)) view.params[k] = v;
  }
  return view;
}

export function format(view: View): string {
  const q = new URLSearchParams();
  q.set("range", view.range);
  q.set("granularity", view.granularity);
  if (view.range === "custom") {
    if (view.from) q.set("from", view.from);
    if (view.to) q.set("to", view.to);
  }
  for (const [k, v] of Object.entries(view.params)) if (v) q.set(k, v);
  return `#/${view.page}?${q}`;
}

/** The event-time range of a view, as API parameters. */
export function rangeParams(view: View, now = Date.now()): { from: string; to: string } {
  if (view.range === "custom" && view.from && view.to) return { from: view.from, to: view.to };
  const secs = RANGES[view.range] ?? 86_400;
  const to = Math.ceil(now / 60_000) * 60 + 60;
  return { from: String(to - secs - 60), to: String(to) };
}

/** Today and yesterday (UTC days), as API ranges. */
export function days(now = Date.now()): { today: { from: string; to: string }; yesterday: { from: string; to: string } } {
  const start = Math.floor(now / 86_400_000) * 86_400;
  return {
    today: { from: String(start), to: String(start + 86_400) },
    yesterday: { from: String(start - 86_400), to: String(start) },
  };
}
