// The HTTP API of `cloud-aggregator` (docs/api.md): typed reads and the live push.

export interface SalesRow {
  tenant: string;
  bucket?: string;
  channel?: string;
  site?: string;
  country?: string;
  currency?: string;
  orders: number;
  revenue: string;
  placed_orders: number;
  gross_revenue: string;
  cancellations: number;
  cancelled_revenue: string;
  refunds: number;
  refunded_revenue: string;
  units: number;
  average_order_value: string | null;
}

export interface Ranged<T> {
  from: string;
  to: string;
  granularity: string | null;
  rows: T[];
}

export interface ProductRow {
  tenant: string;
  sku: string;
  currency: string;
  units: number;
  revenue: string;
}

export interface SessionRow {
  tenant: string;
  bucket?: string;
  referrer?: string;
  sessions: number;
  bounces: number;
  bounce_rate: number | null;
  average_session_duration_secs: number | null;
  events_in_sessions: number;
}

export interface Behavior {
  from: string;
  to: string;
  sessions: SessionRow[];
  events: { tenant: string; type: string; events: number }[];
  page_views: number;
}

export interface Funnel {
  sessions: number;
  steps: { step: string; sessions: number; step_conversion: number | null; overall_conversion: number | null }[];
}

export interface AttributionRow {
  tenant: string;
  bucket?: string;
  channel?: string;
  campaign?: string;
  currency: string;
  attributed_orders: string;
  attributed_revenue: string;
  touches: number;
  cost: string;
  roas: string | null;
}

export interface Attribution {
  from: string;
  to: string;
  model: string;
  rows: AttributionRow[];
  orders: string;
  unattributed_orders: string;
  unattributed_share: number | null;
}

export interface Level {
  tenant: string;
  sku: string;
  warehouse: string;
  on_hand: number;
  as_of: string;
}

export interface Inventory {
  total_on_hand: number;
  skus: number;
  threshold: number;
  low_stock: Level[];
  levels: Level[];
  cover: { tenant: string; sku: string; on_hand: number; units_sold_7d: number; days_of_cover: number | null }[];
}

export interface SourceHealth {
  source_id: string;
  state: string;
  position?: string;
  n_errors: number;
  n_dropped: number;
  n_quarantined: number;
  /** Events the gateway refused for good, moved aside in the agent's spool. */
  n_refused?: number;
  /** The same, by reason (`foreign_tenant`, `unknown_schema`, `too_large`…). */
  refused_by_reason?: Record<string, number>;
  next_seq: number;
  /** Age of the oldest event not yet acknowledged by the cloud, in milliseconds. */
  lag_ms?: number;
  /** Event time of the newest record it spooled (Unix ms). */
  last_event_time_ms?: number | null;
  /** A database source read by polling: committed rows after its position (at most 1 000 000). */
  rows_behind?: number | null;
  /** A file source: bytes of its open files not read yet. */
  bytes_behind?: number | null;
  last_error?: string | null;
}

/** Why an agent is in its state. */
export interface HealthReason {
  code: string;
  source?: string;
  message: string;
}

/** One agent of `/api/v1/fleet`. */
export interface FleetAgent {
  tenant: string;
  agent_id: string;
  health: {
    state: "healthy" | "degraded" | "cut_off" | "offline" | "revoked";
    reasons: HealthReason[];
    since?: string | null;
  };
  last_heartbeat: string;
  transport: string;
  agent_version: string;
  spool_events: number;
  spool_bytes: number;
  spool_max_bytes: number;
  last_outage?: { from_ms: number; to_ms: number; buffered_events: number } | null;
  /** Central configuration, for agents that take it from the cloud. */
  config?: {
    group: string;
    version?: number | null;
    state: string;
    failed_version?: number | null;
    error?: string | null;
  } | null;
  sources: SourceHealth[];
}

export interface Agent {
  tenant: string;
  agent_id: string;
  received_at: string;
  transport: string;
  remote_addr: string;
  heartbeat: {
    agent_version?: string;
    uptime_secs?: number;
    spool_events?: number;
    spool_bytes?: number;
    spool_capacity_bytes?: number;
    transport?: string;
    sources?: SourceHealth[];
  };
}

/** An API error with what the server said. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

const TOKEN_KEY = "actidash.token";
const URL_KEY = "actidash.url";

/** In the desktop app (Tauri), the API is on another origin: the saved connection's. */
export const desktop = "__TAURI_INTERNALS__" in window;

/** The API's origin: none in the browser (the app is served by the API itself). */
export function apiBase(): string {
  return desktop ? (localStorage.getItem(URL_KEY) ?? "").replace(/\/+$/, "") : "";
}

/** The desktop's connection: the API's address and a token. */
export function setConnection(url: string, value: string): void {
  localStorage.setItem(URL_KEY, url.trim().replace(/\/+$/, ""));
  setToken(value);
}

/**
 * The API token: taken once from the address (`/?token=…`, what the demo prints and what a
 * colleague shares), then kept in this browser's storage and removed from the address.
 */
export function token(): string | null {
  const fromUrl = new URLSearchParams(location.search).get("token");
  if (fromUrl) {
    if (fromUrl !== localStorage.getItem(TOKEN_KEY)) setToken(fromUrl);
    history.replaceState(null, "", `${location.pathname}${location.hash}`);
  }
  return localStorage.getItem(TOKEN_KEY);
}

export function setToken(value: string | null): void {
  // Another token may be another tenant's: figures kept for offline use are not its to see.
  for (const key of Object.keys(localStorage)) if (key.startsWith("actidash.last.")) localStorage.removeItem(key);
  if (value) localStorage.setItem(TOKEN_KEY, value.trim());
  else localStorage.removeItem(TOKEN_KEY);
}

/** GET a JSON document of the API (`path` starts with `/api/`). */
export async function get<T>(path: string, params: Record<string, string | undefined> = {}): Promise<T> {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== "") query.set(k, v);
  }
  const url = `${apiBase()}${query.size > 0 ? `${path}?${query}` : path}`;
  let response: Response;
  try {
    const headers: Record<string, string> = { Accept: "application/json" };
    const t = token();
    if (t) headers.Authorization = `Bearer ${t}`;
    response = await fetch(url, { headers });
  } catch (e) {
    throw new ApiError(0, `the API cannot be reached (${(e as Error).message})`);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") message = body.error;
    } catch {
      // not JSON: keep the status line
    }
    throw new ApiError(response.status, message);
  }
  return (await response.json()) as T;
}

/** The live push's state, as the status bar shows it. */
export type LiveState = "connecting" | "live" | "reconnecting";

/**
 * Follows `/api/v1/live`: calls `onUpdate` with the dashboards whose figures changed and the
 * server's "as of" time. The browser's EventSource reconnects by itself after an error; the
 * first update after a (re)connection names every dashboard.
 */
export function follow(
  onUpdate: (changed: string[], asOf: string) => void,
  onState: (state: LiveState) => void,
): () => void {
  onState("connecting");
  const t = token();
  const source = new EventSource(`${apiBase()}/api/v1/live${t ? `?access_token=${encodeURIComponent(t)}` : ""}`);
  source.addEventListener("open", () => onState("live"));
  source.addEventListener("error", () => onState("reconnecting"));
  source.addEventListener("update", (e) => {
    onState("live");
    try {
      const data = JSON.parse((e as MessageEvent<string>).data);
      onUpdate(Array.isArray(data.changed) ? data.changed : [], String(data.as_of ?? ""));
    } catch {
      // a malformed push changes nothing; the next one will do
    }
  });
  return () => source.close();
}
