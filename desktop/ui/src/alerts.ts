// Alerts: what the API says needs attention now (`/api/v1/alerts`: low stock; for ops, agents
// offline or cut off, a source stopped on an error, a full spool). In the header, a button with
// their count opens the list. In the desktop app, each new alert is also a desktop notification
// (a summary when many arrive at once), unless notifications are muted in the list's setting.

import { ApiError, apiBase, desktop, get } from "./api";
import { esc, time } from "./format";

export interface Alert {
  key: string;
  kind: string;
  severity: "warning" | "critical";
  tenant: string;
  subject: string;
  message: string;
  since: string;
}

interface AlertsReport {
  as_of: string;
  threshold: number;
  fleet: boolean;
  alerts: Alert[];
}

type Invoke = (cmd: string, args?: Record<string, unknown>) => Promise<unknown>;

function invoke(): Invoke | null {
  const internals = (window as unknown as { __TAURI_INTERNALS__?: { invoke: Invoke } }).__TAURI_INTERNALS__;
  return internals ? internals.invoke : null;
}

const KINDS: Record<string, string> = {
  low_stock: "Low stock",
  agent_offline: "Agent offline",
  source_error: "Source stopped",
  spool_full: "Spool full",
};

/** Every 30 s besides the live push: an agent going silent changes nothing in the store. */
const POLL_MS = 30_000;
/** More new alerts than this at once make one summary notification. */
const ONE_BY_ONE = 3;

let current: Alert[] = [];
let checked = false;
let notified = 0;
let muted = false;
let button: HTMLButtonElement;
let list: HTMLElement;
let timer: number | undefined;

/** What the probe reports of the alerts (for the desktop test). */
export function alertState(): Record<string, string> {
  return { __alerts: String(current.length), __alerts_checked: String(checked), __notified: String(notified), __muted: String(muted) };
}

/** Keys already notified, per API: an alert is notified once while it lasts. */
function seenKey(): string {
  return `actidash.notified.${apiBase() || location.origin}`;
}

function loadSeen(): Set<string> | null {
  try {
    const raw = localStorage.getItem(seenKey());
    return raw === null ? null : new Set(JSON.parse(raw) as string[]);
  } catch {
    return null;
  }
}

function saveSeen(keys: string[]): void {
  try {
    localStorage.setItem(seenKey(), JSON.stringify(keys));
  } catch {
    // storage refused: alerts may be notified again, nothing else lost
  }
}

async function notify(title: string, body: string): Promise<void> {
  const shown = (await invoke()?.("notify", { title, body }).catch(() => false)) as boolean | undefined;
  if (shown) notified += 1;
}

/** Notifies what is new since the last look (nothing when muted: muting means "not these"). */
async function notifyNew(alerts: Alert[]): Promise<void> {
  if (!desktop) return;
  const seen = loadSeen() ?? new Set<string>();
  const fresh = alerts.filter((a) => !seen.has(a.key));
  saveSeen(alerts.map((a) => a.key));
  if (fresh.length === 0 || muted) return;
  if (fresh.length <= ONE_BY_ONE) {
    for (const a of fresh) await notify(`ActiDash: ${KINDS[a.kind] ?? a.kind}`, a.message);
    return;
  }
  const counts = new Map<string, number>();
  for (const a of fresh) counts.set(a.kind, (counts.get(a.kind) ?? 0) + 1);
  const parts = [...counts].map(([k, n]) => `${n} × ${(KINDS[k] ?? k).toLowerCase()}`);
  await notify(`ActiDash: ${fresh.length} new alerts`, `${parts.join(", ")}. Open ActiDash to see them.`);
}

function renderList(): void {
  const critical = current.some((a) => a.severity === "critical");
  button.textContent = current.length === 0 ? "No alerts" : `${current.length} alert${current.length === 1 ? "" : "s"}`;
  button.className = `alerts-button ${current.length === 0 ? "" : critical ? "critical" : "warning"}`;
  button.dataset.count = String(current.length);
  const items = current
    .map(
      (a) =>
        `<li class="${a.severity}" data-key="${esc(a.key)}"><b>${esc(KINDS[a.kind] ?? a.kind)}</b> · ${esc(a.tenant)} · <span class="muted">since ${esc(time(a.since))}</span><br />${esc(a.message)}</li>`,
    )
    .join("");
  // Only the entries change: the setting above them keeps its element (and the focus).
  list.querySelector(".entries")!.innerHTML = current.length === 0 ? '<p class="empty">Nothing needs attention.</p>' : `<ul>${items}</ul>`;
}

let running: Promise<void> | null = null;
let again = false;

/**
 * Reads the alerts again (one read at a time: one asked for meanwhile runs once after it); on
 * failure the last ones stay (the page shows the stale state).
 */
export async function refreshAlerts(after?: () => void): Promise<void> {
  if (running) {
    again = true;
    return running;
  }
  running = (async () => {
    do {
      again = false;
      await readAlerts();
    } while (again);
  })();
  try {
    await running;
  } finally {
    running = null;
    window.clearTimeout(timer);
    timer = window.setTimeout(() => void refreshAlerts(after), POLL_MS);
    after?.();
  }
}

async function readAlerts(): Promise<void> {
  try {
    const report = await get<AlertsReport>("/api/v1/alerts");
    current = report.alerts;
    renderList();
    await notifyNew(current);
    checked = true;
  } catch (e) {
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) button.hidden = true;
  }
}

/** The header's alerts button and list; reads the desktop's mute setting first. */
export async function alertsControl(host: HTMLElement, before: Element): Promise<void> {
  if (desktop) {
    try {
      const settings = JSON.parse(((await invoke()?.("load_settings")) as string | undefined) ?? "{}");
      muted = settings.notifications === false;
    } catch {
      muted = false;
    }
  }
  const wrap = document.createElement("div");
  wrap.className = "alerts";
  wrap.innerHTML = `<button type="button" aria-expanded="false" aria-controls="alert-list">Alerts</button><div id="alert-list" class="alert-list" hidden></div>`;
  button = wrap.querySelector("button")!;
  list = wrap.querySelector("#alert-list")!;
  button.onclick = () => {
    list.hidden = !list.hidden;
    button.setAttribute("aria-expanded", String(!list.hidden));
  };
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && !list.hidden) {
      list.hidden = true;
      button.setAttribute("aria-expanded", "false");
      button.focus();
    }
  });
  list.innerHTML = `${
    desktop
      ? `<label class="mute"><input type="checkbox" id="notifications" ${muted ? "" : "checked"} /> Desktop notifications for new alerts</label>`
      : ""
  }<div class="entries"></div>`;
  const box = list.querySelector<HTMLInputElement>("#notifications");
  if (box) {
    box.onchange = async () => {
      muted = !box.checked;
      await invoke()?.("save_settings", { json: JSON.stringify({ notifications: !muted }) });
    };
  }
  renderList();
  host.insertBefore(wrap, before);
}
