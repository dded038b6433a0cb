// The pages. Each reads what it shows from the API and renders it into its element; numbers
// carry `data-metric` names so that tests can compare them with the API's.

import type { Agent, Attribution, Behavior, FleetAgent, Funnel, Inventory, ProductRow, Ranged, SalesRow } from "./api";
import { get } from "./api";
import { bucketTimes, lineChart } from "./chart";
import { ago, bytes, duration, esc, money, number, percent, time } from "./format";
import type { Page, View } from "./view";
import { MODELS, days, rangeParams } from "./view";

/** Which dashboards of the live push each page shows. */
export const FEEDS: Record<Page, string[]> = {
  overview: ["sales", "behavior", "marketing", "fleet"],
  sales: ["sales"],
  marketing: ["marketing", "sales"],
  behavior: ["behavior"],
  inventory: ["inventory", "sales"],
  fleet: ["fleet"],
};

/** The dimensions each page filters by (`channel=web,app` in the URL). */
export const FILTERS: Record<Page, string[]> = {
  overview: [],
  sales: ["channel", "site", "country", "currency"],
  marketing: ["channel", "campaign", "currency"],
  behavior: ["referrer"],
  inventory: ["sku", "warehouse"],
  fleet: [],
};

export const TITLES: Record<Page, string> = {
  overview: "Overview",
  sales: "Sales",
  marketing: "Marketing",
  behavior: "Behavior",
  inventory: "Inventory",
  fleet: "Fleet",
};

type Render = (view: View, el: HTMLElement) => Promise<void>;

export const RENDER: Record<Page, Render> = { overview, sales, marketing, behavior, inventory, fleet };

const EMPTY =
  "No data in this range yet. Widen the time range, or open the Fleet page to check that agents are sending.";

function card(label: string, metric: string, value: string, sub = ""): string {
  return `<div class="card"><div class="label">${esc(label)}</div><div class="value" data-metric="${esc(metric)}">${esc(value)}</div>${
    sub ? `<div class="sub">${esc(sub)}</div>` : ""
  }</div>`;
}

function table(headers: string[], rows: string[][], cls = ""): string {
  if (rows.length === 0) return `<p class="empty">${EMPTY}</p>`;
  const head = headers.map((h) => `<th>${esc(h)}</th>`).join("");
  const body = rows.map((r) => `<tr>${r.join("")}</tr>`).join("");
  return `<div class="scroll"><table class="${cls}"><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table></div>`;
}

function td(text: string, metric?: string, num = false): string {
  const attr = metric ? ` data-metric="${esc(metric)}"` : "";
  return `<td${attr}${num ? ' class="num"' : ""}>${esc(text)}</td>`;
}

function filters(view: View, dims: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const d of dims) if (view.params[d]) out[d] = view.params[d];
  return out;
}

function sum(values: number[]): number {
  return values.reduce((a, b) => a + b, 0);
}

/** Change against a reference, as "+12 % vs yesterday". */
function versus(now: number, before: number, what: string): string {
  if (before === 0) return now === 0 ? `same as ${what}` : `new since ${what}`;
  const change = (now - before) / before;
  return `${change >= 0 ? "+" : ""}${percent(change)} vs ${what}`;
}

function chartBox(id: string, title: string): string {
  return `<section class="panel"><h2>${esc(title)}</h2><div class="chart" id="${id}"></div></section>`;
}

async function overview(view: View, el: HTMLElement): Promise<void> {
  const { today, yesterday } = days();
  const range = rangeParams(view);
  const [salesToday, salesYesterday, behToday, behYesterday, funnel, series, agents] = await Promise.all([
    get<Ranged<SalesRow>>("/api/v1/sales", { ...today, group_by: "currency" }),
    get<Ranged<SalesRow>>("/api/v1/sales", { ...yesterday, group_by: "currency" }),
    get<Behavior>("/api/v1/behavior", today),
    get<Behavior>("/api/v1/behavior", yesterday),
    get<Funnel>("/api/v1/behavior/funnel", today),
    get<Ranged<SalesRow>>("/api/v1/sales", { ...range, granularity: view.granularity }),
    // The fleet needs an ops token: a viewer's Overview has no freshness, and says why.
    get<Agent[]>("/api/v1/agents").catch(() => null),
  ]);
  const orders = sum(salesToday.rows.map((r) => r.orders));
  const ordersBefore = sum(salesYesterday.rows.map((r) => r.orders));
  const sessions = sum(behToday.sessions.map((s) => s.sessions));
  const sessionsBefore = sum(behYesterday.sessions.map((s) => s.sessions));
  const last = funnel.steps[funnel.steps.length - 1];
  const conversion = funnel.sessions > 0 && last ? last.sessions / funnel.sessions : null;
  const newest = agents?.map((a) => a.received_at).sort().pop();
  const cards = [
    card("Orders today", "orders", number(orders), versus(orders, ordersBefore, "yesterday")),
    ...salesToday.rows.map((r) => {
      const before = salesYesterday.rows.find((y) => y.currency === r.currency);
      return card(
        `Revenue today (${r.currency})`,
        `revenue.${r.currency}`,
        money(r.revenue, r.currency),
        versus(Number(r.revenue), Number(before?.revenue ?? 0), "yesterday"),
      );
    }),
    ...salesToday.rows.map((r) =>
      card(`Average order (${r.currency})`, `aov.${r.currency}`, money(r.average_order_value, r.currency)),
    ),
    card("Sessions today", "sessions", number(sessions), versus(sessions, sessionsBefore, "yesterday")),
    card("Conversion today", "conversion", percent(conversion), last ? `sessions with a ${last.step}` : ""),
    agents === null
      ? card("Freshness", "freshness", "–", "needs a token of role ops")
      : card("Freshness", "freshness", newest ? ago(newest) : "no agent yet", newest ? `last heartbeat ${time(newest)}` : ""),
  ];
  el.innerHTML = `<div class="cards">${cards.join("")}</div>${chartBox("overview-chart", "Orders")}`;
  const times = bucketTimes(series.rows);
  const byTime = new Map<number, number>();
  for (const r of series.rows) {
    const t = Date.parse(r.bucket ?? "") / 1000;
    byTime.set(t, (byTime.get(t) ?? 0) + r.orders);
  }
  lineChart(el.querySelector<HTMLElement>("#overview-chart")!, times, [
    { label: "orders", values: times.map((t) => byTime.get(t) ?? 0) },
  ], range);
}

const SALES_DIMS = ["channel", "site", "country", "currency"];

async function sales(view: View, el: HTMLElement): Promise<void> {
  const range = rangeParams(view);
  const by = SALES_DIMS.includes(view.params.group_by ?? "") ? view.params.group_by! : "channel";
  const groupBy = by === "currency" ? "currency" : `${by},currency`;
  const sort = view.params.sort === "units" ? "units" : "revenue";
  const f = filters(view, SALES_DIMS);
  const [grouped, series, products] = await Promise.all([
    get<Ranged<SalesRow>>("/api/v1/sales", { ...range, ...f, group_by: groupBy }),
    get<Ranged<SalesRow>>("/api/v1/sales", { ...range, ...f, granularity: view.granularity, group_by: "currency" }),
    get<Ranged<ProductRow>>("/api/v1/sales/products", { ...range, sort, limit: "20", ...filtersOf(f, ["currency"]) }),
  ]);
  const times = bucketTimes(series.rows);
  const dimOptions = SALES_DIMS.map((d) => `<option value="${d}"${d === by ? " selected" : ""}>${d}</option>`).join("");
  const rows = grouped.rows.map((r) => [
    ...(by === "currency" ? [] : [td(String(r[by as keyof SalesRow] ?? ""))]),
    td(r.currency ?? ""),
    td(number(r.orders), `orders.${r[by as keyof SalesRow]}.${r.currency}`, true),
    td(money(r.revenue, r.currency), `revenue.${r[by as keyof SalesRow]}.${r.currency}`, true),
    td(money(r.average_order_value, r.currency), undefined, true),
    td(number(r.units), undefined, true),
    td(number(r.cancellations), undefined, true),
    td(number(r.refunds), undefined, true),
  ]);
  el.innerHTML = `
    ${chartBox("sales-chart", "Orders and units")}
    <section class="panel"><h2>By <select id="group-by" aria-label="Group by">${dimOptions}</select></h2>
      ${table([...(by === "currency" ? [] : [by]), "currency", "orders", "revenue", "average order", "units", "cancellations", "refunds"], rows)}
    </section>
    <section class="panel"><h2>Top products by
      <select id="sort" aria-label="Sort products by"><option value="revenue"${sort === "revenue" ? " selected" : ""}>revenue</option><option value="units"${sort === "units" ? " selected" : ""}>units</option></select>
      <span class="hint">(kept per hour: ${esc(time(products.from))} to ${esc(time(products.to))})</span></h2>
      ${table(
        ["SKU", "currency", "units", "revenue"],
        products.rows.map((p) => [td(p.sku), td(p.currency), td(number(p.units), `units.${p.sku}`, true), td(money(p.revenue, p.currency), `product-revenue.${p.sku}`, true)]),
      )}
    </section>`;
  const perBucket = (pick: (r: SalesRow) => number) =>
    times.map((t) => sum(series.rows.filter((r) => Date.parse(r.bucket ?? "") / 1000 === t).map(pick)));
  lineChart(el.querySelector<HTMLElement>("#sales-chart")!, times, [
    { label: "orders", values: perBucket((r) => r.orders) },
    { label: "units", values: perBucket((r) => r.units) },
  ], range);
  el.querySelector<HTMLSelectElement>("#group-by")!.onchange = (e) =>
    navigate({ ...view, params: { ...view.params, group_by: (e.target as HTMLSelectElement).value } });
  el.querySelector<HTMLSelectElement>("#sort")!.onchange = (e) =>
    navigate({ ...view, params: { ...view.params, sort: (e.target as HTMLSelectElement).value } });
}

function filtersOf(f: Record<string, string>, keep: string[]): Record<string, string> {
  return Object.fromEntries(Object.entries(f).filter(([k]) => keep.includes(k)));
}

const MODEL_NAMES: Record<string, string> = {
  last_touch: "Last touch",
  first_touch: "First touch",
  linear: "Linear",
  time_decay: "Time decay",
  position_based: "Position based",
};

async function marketing(view: View, el: HTMLElement): Promise<void> {
  const range = rangeParams(view);
  const model = (MODELS as readonly string[]).includes(view.params.model ?? "") ? view.params.model! : "last_touch";
  const by = ["channel", "campaign", "channel,campaign"].includes(view.params.group_by ?? "")
    ? view.params.group_by!
    : "channel,campaign";
  const f = filters(view, ["channel", "campaign", "currency"]);
  const granularity = view.granularity === "minute" ? "hour" : view.granularity;
  const [report, series] = await Promise.all([
    get<Attribution>("/api/v1/marketing/attribution", { ...range, ...f, model, group_by: by }),
    get<Attribution>("/api/v1/marketing/attribution", { ...range, ...f, model, granularity }),
  ]);
  const models = MODELS.map(
    (m) => `<button type="button" class="seg${m === model ? " on" : ""}" data-model="${m}" aria-pressed="${m === model}">${MODEL_NAMES[m]}</button>`,
  ).join("");
  const cols = by.split(",");
  const rows = report.rows.map((r) => [
    ...cols.map((c) => td(String(r[c as "channel" | "campaign"] ?? ""))),
    td(r.currency),
    td(number(r.attributed_orders, 2), `attributed-orders.${cols.map((c) => r[c as "channel" | "campaign"]).join("/")}.${r.currency}`, true),
    td(money(r.attributed_revenue, r.currency), `attributed-revenue.${cols.map((c) => r[c as "channel" | "campaign"]).join("/")}.${r.currency}`, true),
    td(number(r.touches), undefined, true),
    td(money(r.cost, r.currency), undefined, true),
    td(r.roas === null ? "–" : `${number(r.roas, 2)}×`, undefined, true),
  ]);
  el.innerHTML = `
    <div class="segs" role="group" aria-label="Attribution model">${models}</div>
    <div class="cards">
      ${card("Orders credited", "credited-orders", number(report.orders, 2))}
      ${card("Without a touch", "unattributed-share", percent(report.unattributed_share), `${number(report.unattributed_orders, 2)} orders`)}
    </div>
    ${chartBox("marketing-chart", `Attributed orders (${MODEL_NAMES[model]})`)}
    <section class="panel"><h2>Spend and return by ${esc(by.replace(",", " and "))}
      <span class="hint">(credit kept per hour: ${esc(time(report.from))} to ${esc(time(report.to))})</span></h2>
      ${table([...cols, "currency", "attributed orders", "attributed revenue", "touches", "cost", "ROAS"], rows)}
    </section>`;
  const times = bucketTimes(series.rows);
  lineChart(el.querySelector<HTMLElement>("#marketing-chart")!, times, [
    {
      label: "attributed orders",
      values: times.map((t) =>
        sum(series.rows.filter((r) => Date.parse(r.bucket ?? "") / 1000 === t).map((r) => Number(r.attributed_orders))),
      ),
    },
  ], range);
  for (const b of el.querySelectorAll<HTMLButtonElement>("button[data-model]")) {
    b.onclick = () => navigate({ ...view, params: { ...view.params, model: b.dataset.model! } });
  }
}

async function behavior(view: View, el: HTMLElement): Promise<void> {
  const range = rangeParams(view);
  const f = filters(view, ["referrer"]);
  const [totals, series, funnel] = await Promise.all([
    get<Behavior>("/api/v1/behavior", { ...range, ...f }),
    get<Behavior>("/api/v1/behavior", { ...range, ...f, granularity: view.granularity }),
    get<Funnel>("/api/v1/behavior/funnel", { ...range, ...f }),
  ]);
  const s = totals.sessions[0];
  const times = bucketTimes(series.sessions);
  const steps = funnel.steps.map((step) => [
    td(step.step),
    td(number(step.sessions), `funnel.${step.step}`, true),
    `<td class="bar"><span style="width:${Math.round((step.overall_conversion ?? 0) * 100)}%"></span></td>`,
    td(percent(step.step_conversion), undefined, true),
    td(percent(step.overall_conversion), undefined, true),
  ]);
  el.innerHTML = `
    <div class="cards">
      ${card("Sessions", "sessions", number(s?.sessions ?? 0))}
      ${card("Bounce rate", "bounce-rate", percent(s?.bounce_rate))}
      ${card("Average duration", "duration", duration(s?.average_session_duration_secs))}
      ${card("Page views", "page-views", number(totals.page_views))}
    </div>
    ${chartBox("behavior-chart", "Sessions")}
    <section class="panel"><h2>Funnel</h2>
      ${table(["step", "sessions", "", "step conversion", "overall"], funnel.sessions > 0 ? steps : [])}
    </section>
    <section class="panel"><h2>Events by type</h2>
      ${table(["type", "events"], totals.events.map((e) => [td(e.type), td(number(e.events), `events.${e.type}`, true)]))}
    </section>`;
  lineChart(el.querySelector<HTMLElement>("#behavior-chart")!, times, [
    {
      label: "sessions",
      values: times.map((t) => sum(series.sessions.filter((r) => Date.parse(r.bucket ?? "") / 1000 === t).map((r) => r.sessions))),
    },
  ], range);
}

async function inventory(view: View, el: HTMLElement): Promise<void> {
  const f = filters(view, ["sku", "warehouse"]);
  const inv = await get<Inventory>("/api/v1/inventory", { ...f, limit: "200", threshold: view.params.threshold });
  const levelRow = (l: Inventory["levels"][number]) => [
    td(l.sku),
    td(l.warehouse),
    td(number(l.on_hand), `on-hand.${l.sku}.${l.warehouse}`, true),
    td(time(l.as_of)),
  ];
  el.innerHTML = `
    <div class="cards">
      ${card("Units on hand", "total-on-hand", number(inv.total_on_hand))}
      ${card("SKUs", "skus", number(inv.skus))}
      ${card(`Low stock (below ${inv.threshold})`, "low-stock", number(inv.low_stock.length))}
    </div>
    <section class="panel"><h2>Low stock, lowest first</h2>${table(["SKU", "warehouse", "on hand", "as of"], inv.low_stock.map(levelRow), "warn")}</section>
    <section class="panel"><h2>Days of cover (units sold in the last 7 days)</h2>
      ${table(
        ["SKU", "on hand", "sold in 7 days", "days of cover"],
        inv.cover.map((c) => [td(c.sku), td(number(c.on_hand), undefined, true), td(number(c.units_sold_7d), undefined, true), td(number(c.days_of_cover, 1), `cover.${c.sku}`, true)]),
      )}
    </section>
    <section class="panel"><h2>On hand per SKU and warehouse</h2>${table(["SKU", "warehouse", "on hand", "as of"], inv.levels.map(levelRow))}</section>`;
}

/** " (foreign_tenant 2, too_large 1)", or nothing. */
function refusedReasons(byReason: Record<string, number> | undefined): string {
  const parts = Object.entries(byReason ?? {}).map(([reason, n]) => `${esc(reason)} ${number(n)}`);
  return parts.length ? ` (${parts.join(", ")})` : "";
}

const STATE_LABEL: Record<FleetAgent["health"]["state"], string> = {
  healthy: "healthy",
  degraded: "degraded",
  cut_off: "cut off",
  offline: "offline",
  revoked: "revoked",
};

async function fleet(_view: View, el: HTMLElement): Promise<void> {
  const { agents } = await get<{ agents: FleetAgent[] }>("/api/v1/fleet");
  const rows = agents.map((a) => {
    const sources = a.sources
      .map(
        (s) =>
          `<div class="source ${s.n_errors > 0 || s.state === "error" ? "bad" : ""}"><b>${esc(s.source_id)}</b> ${esc(s.state)}` +
          `${s.lag_ms ? `, ${esc(duration(s.lag_ms / 1000))} behind` : ""}` +
          `${s.bytes_behind ? `, ${bytes(s.bytes_behind)} unread` : ""}` +
          `${s.rows_behind ? `, ${number(s.rows_behind)} rows unread` : ""}` +
          `${s.last_event_time_ms ? `, last event ${esc(ago(new Date(s.last_event_time_ms).toISOString()))}` : ""}` +
          `${s.n_errors ? `, ${number(s.n_errors)} errors` : ""}${s.n_quarantined ? `, ${number(s.n_quarantined)} dead letters` : ""}` +
          `${s.n_refused ? `, ${number(s.n_refused)} refused${refusedReasons(s.refused_by_reason)}` : ""}` +
          `${s.last_error ? ` — ${esc(s.last_error)}` : ""}</div>`,
      )
      .join("");
    const full = a.spool_max_bytes ? ` (${percent(a.spool_bytes / a.spool_max_bytes)} full)` : "";
    const reasons = a.health.reasons.map((r) => `<div class="reason">${esc(r.message)}</div>`).join("");
    const outage = a.last_outage
      ? `<div class="reason">last cut off ${esc(ago(new Date(a.last_outage.from_ms).toISOString()))} for ` +
        `${esc(duration((a.last_outage.to_ms - a.last_outage.from_ms) / 1000))}, ${number(a.last_outage.buffered_events)} events buffered</div>`
      : "";
    return [
      td(a.agent_id, `agent.${a.agent_id}`),
      td(a.tenant),
      `<td data-metric="state.${esc(a.agent_id)}"><span class="state ${esc(a.health.state)}">${esc(STATE_LABEL[a.health.state] ?? a.health.state)}</span>${reasons}${outage}</td>`,
      td(ago(a.last_heartbeat), `heartbeat.${a.agent_id}`),
      td(a.transport),
      td(`${number(a.spool_events)} events, ${bytes(a.spool_bytes)}${full}`, undefined, true),
      `<td>${sources || "–"}</td>`,
      td(a.agent_version || "–"),
      td(
        a.config
          ? `${a.config.group} ${a.config.version != null ? `v${a.config.version}` : "(local file)"} ${a.config.state.replace("_", " ")}`
          : "local file",
        `config.${a.agent_id}`,
      ),
    ];
  });
  el.innerHTML = `<section class="panel"><h2>Agents</h2>${
    rows.length === 0
      ? '<p class="empty">No agent has reported yet. Enroll one (<code>edge-agent enroll</code>) and start it; it appears here within a heartbeat.</p>'
      : table(["agent", "tenant", "health", "last heartbeat", "transport", "spool", "sources", "version", "configuration"], rows)
  }</section>`;
}

/** Set by main: moves to another view. */
export let navigate: (view: View) => void = () => {};
export function setNavigate(f: (view: View) => void): void {
  navigate = f;
}
