//! The HTTP API (axum): the analytics per dashboard, fleet health, counters, live push, and the
//! dashboard page.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | the process is up |
//! | `GET /readyz` | the serving store answers (503 otherwise) |
//! | `GET /api/v1/sales` | orders, revenue, AOV, units, cancellations, refunds; group-by and filters `channel`, `site`, `country`, `currency` |
//! | `GET /api/v1/sales/totals` | the same, all time, per channel and currency (a flat list) |
//! | `GET /api/v1/sales/products` | top products: `sort=revenue\|units`, `limit`, filters `sku`, `currency` |
//! | `GET /api/v1/behavior` | sessions, bounces, bounce rate, mean duration (group-by and filter `referrer`), events per type, page views |
//! | `GET /api/v1/behavior/funnel` | sessions per step, step and overall conversion: `steps=page_view,add_to_cart,…`, filter `referrer` |
//! | `GET /api/v1/marketing/attribution` | `model=last_touch\|first_touch\|linear\|time_decay\|position_based`: attributed orders and revenue, cost, ROAS per `channel`/`campaign` and currency; orders without touch |
//! | `GET /api/v1/inventory` | latest on-hand per SKU and warehouse, total, low stock (`threshold`), days of cover (`as_of`); filters `sku`, `warehouse` |
//! | `GET /api/v1/events` | events per domain |
//! | `GET /api/v1/agents` | each agent's last heartbeat |
//! | `GET /api/v1/alerts` | what needs attention now: low stock; agents offline, with a source stopped or a full spool (`alerts.rs`) |
//! | `GET /api/v1/stats` | processing counters and analytics state size |
//! | `GET /api/v1/me` | the token making the request: id, tenant, role |
//! | `GET`, `POST /api/v1/tokens`, `DELETE /api/v1/tokens/{id}` | API tokens: list, create, revoke (admin; `admin.rs`) |
//! | `POST /api/v1/agents/{id}/revoke` | revoke an agent (admin) |
//! | `GET /api/v1/live` | server-sent events: an `update` with the figures of every dashboard that changed |
//! | `GET /api/v1/openapi.json` | the OpenAPI document of the routes above |
//! | `GET /` | the dashboards (`[serve] ui_dir`), or a page that says how to build them |
//!
//! Every `/api/v1` route needs an API token (`auth.rs`); `/healthz` and `/readyz` do not.
//!
//! Common parameters: `tenant`; `from`, `to` (event time, RFC 3339 or unix seconds; `[from,
//! to)`, whole minutes; default: the last 24 hours); `granularity` (`minute`, `hour`, `day`:
//! a series; absent: one total over the range); `group_by` (comma-separated dimensions);
//! dimension filters (`channel=web,app`: any of the values). An unknown or malformed
//! parameter is a 400 that names it. Money is exact decimal text.
//!
//! The API reads the store through its own connection (read-only snapshots on PostgreSQL); it
//! learns of new data from SQLite's `data_version` or the store's change versions, so it works
//! the same whether the processors run in this process or on other hosts.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use futures::Stream;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::analytics::AnalyticsConfig;
use crate::analytics::attribution::Model;
use crate::analytics::tables::{self, TableSpec};
use crate::api_tokens::ApiTokens;
use crate::store::db::DbError;
use crate::store::query::{self, Selection};
use crate::store::{Location, Store, StoreError};

mod admin;
pub mod alerts;
mod auth;
mod openapi;

pub use auth::DEFAULT_RATE as DEFAULT_RATE_PER_TOKEN;

const DASHBOARD: &str = include_str!("dashboard.html");

/// Longest range a query may span.
const MAX_RANGE_SECS: i64 = 400 * 86_400;
/// Most buckets a series may have.
const MAX_BUCKETS: i64 = 50_000;

/// Most API connections open at once (live subscribers included); more wait in the backlog.
const MAX_API_CONNECTIONS: usize = 1024;

/// The store's reader connections: requests and live subscribers read in parallel, one per
/// connection, as many at once as there are readers.
struct Readers {
    idle: Mutex<Vec<Store>>,
    permits: tokio::sync::Semaphore,
    location: Location,
}

impl Readers {
    fn open(location: Location, n: usize) -> Result<Readers, StoreError> {
        let stores = (0..n).map(|_| location.open_reader()).collect::<Result<Vec<_>, _>>()?;
        Ok(Readers { idle: Mutex::new(stores), permits: tokio::sync::Semaphore::new(n), location })
    }

    /// Runs `f` on an idle reader, off the async workers.
    async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<Result<T, StoreError>, tokio::task::JoinError> {
        // The semaphore is never closed.
        let _permit = self.permits.acquire().await;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let idle = me.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            // A reader lost to a panic is opened again.
            let mut store = match idle {
                Some(store) => store,
                None => me.location.open_reader()?,
            };
            let result = f(&mut store);
            me.idle.lock().unwrap_or_else(|p| p.into_inner()).push(store);
            result
        })
        .await
    }
}

impl Drop for Readers {
    /// The synchronous PostgreSQL client closes by blocking on a runtime of its own, which
    /// panics on a thread that drives the async runtime (where the API's state is dropped at
    /// shutdown): the readers are closed on a thread of their own.
    fn drop(&mut self) {
        let stores = std::mem::take(self.idle.get_mut().unwrap_or_else(|p| p.into_inner()));
        if !stores.is_empty() {
            let _ = std::thread::spawn(move || drop(stores)).join();
        }
    }
}

#[derive(Clone)]
struct AppState {
    readers: Arc<Readers>,
    changes: watch::Receiver<i64>,
    analytics: Arc<AnalyticsConfig>,
    admin: Arc<Admin>,
}

/// The registry the admin routes change, and the alerts' setting.
struct Admin {
    tokens: ApiTokens,
    fleet: Arc<crate::fleet::Fleet>,
    agent_offline_after: chrono::Duration,
}

/// An API error, as JSON with a status.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn bad(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message)
}

/// Serves the API on `listen` until shutdown.
pub async fn run(
    listen: std::net::SocketAddr,
    store: Location,
    analytics: AnalyticsConfig,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding the API to tcp/{listen}"))?;
    run_on(listener, store, analytics, options, shutdown).await
}

/// What the API serves with besides the store.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The tokens every `/api` request is checked against.
    pub tokens: ApiTokens,
    /// The built dashboards ([`crate::config::ServeConfig::ui_dir`]).
    pub ui_dir: Option<std::path::PathBuf>,
    /// Origins allowed to call the API from a browser.
    pub cors_origins: Vec<String>,
    /// Requests a second per token.
    pub rate_per_token: f64,
    /// The fleet's registry, for the alerts (revoked agents) and the admin routes.
    pub fleet: Arc<crate::fleet::Fleet>,
    /// An agent silent this long is alerted as offline.
    pub agent_offline_after: Duration,
    /// How long a client may take to send a request's headers (hyper's timer; without one a
    /// half-sent request would hold its connection for ever).
    pub header_read_timeout: Duration,
    /// Whether the fleet's figures go to the metrics (a recorder is installed).
    pub fleet_metrics: bool,
}

/// Serves the API on a bound listener until shutdown.
pub async fn run_on(
    listener: tokio::net::TcpListener,
    location: Location,
    analytics: AnalyticsConfig,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let ServeOptions {
        tokens,
        ui_dir,
        cors_origins,
        rate_per_token,
        fleet,
        agent_offline_after,
        header_read_timeout,
        fleet_metrics,
    } = options;
    if let Some(dir) = &ui_dir {
        anyhow::ensure!(
            dir.join("index.html").is_file(),
            "[serve] ui_dir {}: no index.html there (build the dashboards with `npm ci && npm run build` in desktop/ui)",
            dir.display()
        );
    }
    let n_readers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
    let readers = Arc::new(Readers::open(location, n_readers)?);
    let version = readers.read(|store| store.data_version()).await.context("reading the store")??;
    let (tx, rx) = watch::channel(version);
    let admin = Admin {
        tokens: tokens.clone(),
        fleet,
        agent_offline_after: chrono::Duration::from_std(agent_offline_after).unwrap_or(chrono::Duration::MAX),
    };
    let state = AppState { readers, changes: rx, analytics: Arc::new(analytics), admin: Arc::new(admin) };
    tokio::spawn(watch_changes(state.readers.clone(), tx, shutdown.clone()));
    if fleet_metrics {
        tokio::spawn(export_fleet(state.readers.clone(), shutdown.clone()));
    }
    let cors = if cors_origins.is_empty() {
        None
    } else {
        let origins = cors_origins
            .iter()
            .map(|o| o.parse::<axum::http::HeaderValue>().with_context(|| format!("[serve] cors_origins: {o:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Some(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST, axum::http::Method::DELETE])
                .allow_headers([axum::http::header::AUTHORIZATION, axum::http::header::CONTENT_TYPE]),
        )
    };
    // One registration makes each route and its entry in the OpenAPI document.
    let (api, doc) = utoipa_axum::router::OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
        .routes(utoipa_axum::routes!(sales))
        .routes(utoipa_axum::routes!(sales_totals))
        .routes(utoipa_axum::routes!(products))
        .routes(utoipa_axum::routes!(behavior))
        .routes(utoipa_axum::routes!(funnel))
        .routes(utoipa_axum::routes!(attribution))
        .routes(utoipa_axum::routes!(inventory))
        .routes(utoipa_axum::routes!(events))
        .routes(utoipa_axum::routes!(agents))
        .routes(utoipa_axum::routes!(fleet_report))
        .routes(utoipa_axum::routes!(fleet_history))
        .routes(utoipa_axum::routes!(alerts))
        .routes(utoipa_axum::routes!(stats))
        .routes(utoipa_axum::routes!(live))
        .routes(utoipa_axum::routes!(admin::me))
        .routes(utoipa_axum::routes!(admin::list_tokens, admin::create_token))
        .routes(utoipa_axum::routes!(admin::revoke_token))
        .routes(utoipa_axum::routes!(admin::revoke_agent))
        .split_for_parts();
    // Served as made at start: one serialization, not one per request.
    let doc = doc.to_json().context("serializing the OpenAPI document")?;
    let api = api
        .route(
            "/api/v1/openapi.json",
            get(move || async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], doc) }),
        )
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state(auth::Auth::new(tokens, rate_per_token), auth::require_token));
    let api = match cors {
        Some(cors) => api.layer(cors),
        None => api,
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(api)
        .route_layer(axum::middleware::from_fn(record_request));
    // The dashboards: the built app (any path that is not a file is the app's own route), or
    // the fallback page.
    let app = match &ui_dir {
        Some(dir) => app.fallback_service(
            tower_http::services::ServeDir::new(dir)
                .fallback(tower_http::services::ServeFile::new(dir.join("index.html"))),
        ),
        None => app.route("/", get(|| async { Html(DASHBOARD) })),
    };
    info!(listen = %listener.local_addr()?, "API listening (HTTP)");
    serve_http(listener, app, header_read_timeout, shutdown).await;
    info!("API stopped");
    Ok(())
}

/// Copies every agent's last heartbeat (when it came, its spool) into the metrics, for
/// alerts on agents that stopped reporting: a dead agent cannot say so itself.
async fn export_fleet(readers: Arc<Readers>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(FLEET_METRICS_REFRESH);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let agents = match readers.read(|store| store.agents(None)).await {
            Ok(Ok(agents)) => agents,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the fleet for the metrics");
                continue;
            }
            Err(_) => continue,
        };
        for a in agents {
            let labels = [("tenant", a.tenant), ("agent", a.agent_id)];
            if let Ok(at) = chrono::DateTime::parse_from_rfc3339(&a.received_at) {
                metrics::gauge!(crate::telemetry::FLEET_LAST_HEARTBEAT, &labels)
                    .set(at.timestamp_millis() as f64 / 1000.0);
            }
            let figure = |name: &str| a.heartbeat.get(name).and_then(serde_json::Value::as_f64);
            if let Some(n) = figure("spool_bytes") {
                metrics::gauge!(crate::telemetry::FLEET_SPOOL_BYTES, &labels).set(n);
            }
            if let Some(n) = figure("spool_events") {
                metrics::gauge!(crate::telemetry::FLEET_SPOOL_EVENTS, &labels).set(n);
            }
        }
    }
}

/// How often the fleet's figures are copied into the metrics.
const FLEET_METRICS_REFRESH: Duration = Duration::from_secs(10);

/// Records each request's latency by route (the route's pattern, not the path: bounded
/// labels), method and status.
async fn record_request(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    metrics::histogram!(
        crate::telemetry::API_REQUEST_SECONDS,
        "route" => route,
        "method" => method,
        "status" => response.status().as_u16().to_string()
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// Serves `app` on `listener` until `shutdown`: HTTP/1.1 with a deadline for each request's
/// headers, at most [`MAX_API_CONNECTIONS`] connections at once, accept errors backed off and
/// warned once a second; then open requests get a few seconds to finish.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_API_CONNECTIONS));
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        warn!(error = %e, "accepting an API connection failed; backing off");
                        last_warning = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "API connection ended");
            }
            drop(permit);
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => warn!("API connections still open 5 s after shutdown; leaving them"),
    }
}

/// Polls the store's data version and publishes changes.
async fn watch_changes(readers: Arc<Readers>, tx: watch::Sender<i64>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match readers.read(|store| store.data_version()).await {
            Ok(Ok(v)) => {
                tx.send_if_modified(|old| {
                    let changed = *old != v;
                    *old = v;
                    changed
                });
            }
            Ok(Err(e)) => warn!(error = %e, "cannot read the store's version"),
            Err(_) => return,
        }
    }
}

async fn query<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&mut dyn crate::store::db::Tx) -> Result<T, DbError> + Send + 'static,
) -> Result<T, ApiError> {
    match state.readers.read(move |store| store.read(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.message().starts_with(query::TOO_MANY_ROWS) => Err(bad(e.message().to_owned())),
        Ok(Err(e)) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// A request's query parameters, taken one by one; what is left over is refused by name.
struct Params(BTreeMap<String, String>);

impl Params {
    fn new(pairs: Vec<(String, String)>) -> Result<Params, ApiError> {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            if map.insert(k.clone(), v).is_some() {
                return Err(bad(format!("parameter {k:?} is given twice (use a comma-separated list)")));
            }
        }
        Ok(Params(map))
    }

    fn take(&mut self, name: &str) -> Option<String> {
        self.0.remove(name).filter(|v| !v.is_empty())
    }

    fn list(&mut self, name: &str) -> Vec<String> {
        self.take(name)
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    }

    fn time(&mut self, name: &str) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.take(name) else { return Ok(None) };
        v.parse::<i64>()
            .ok()
            .or_else(|| chrono::DateTime::parse_from_rfc3339(&v).ok().map(|t| t.timestamp()))
            .map(Some)
            .ok_or_else(|| bad(format!("{name}={v:?}: expected RFC 3339 or unix seconds")))
    }

    fn number(&mut self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.take(name) else { return Ok(None) };
        match v.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(bad(format!("{name}={v:?}: expected a whole number from {min} to {max}"))),
        }
    }

    fn done(self) -> Result<(), ApiError> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(k) => Err(bad(format!("unknown parameter {k:?}"))),
        }
    }

    /// Tenant, range, granularity, group-by and filters over `dims` (the dimensions a report
    /// groups and filters by).
    fn selection(&mut self, dims: &[&str], default_range: i64) -> Result<Selection, ApiError> {
        let tenant = self.take("tenant");
        let now = chrono::Utc::now().timestamp();
        let to = self.time("to")?.unwrap_or(now + 60);
        let from = self.time("from")?.unwrap_or(to.saturating_sub(default_range));
        if from >= to {
            return Err(bad(format!("from={from} must be before to={to}")));
        }
        if to - from > MAX_RANGE_SECS {
            return Err(bad(format!("from..to spans more than {} days", MAX_RANGE_SECS / 86_400)));
        }
        let granularity = match self.take("granularity").as_deref() {
            None => None,
            Some("minute") => Some(60),
            Some("hour") => Some(3600),
            Some("day") => Some(86_400),
            Some(other) => return Err(bad(format!("granularity={other:?}: expected minute, hour or day"))),
        };
        if let Some(g) = granularity
            && (to - from) / g > MAX_BUCKETS
        {
            return Err(bad(format!("granularity: more than {MAX_BUCKETS} buckets in from..to; choose a coarser one")));
        }
        let group_by = self.list("group_by");
        for g in &group_by {
            if !dims.contains(&g.as_str()) {
                return Err(bad(format!("group_by: {g:?} is not one of {}", dims.join(", "))));
            }
        }
        let mut filters = Vec::new();
        for dim in dims {
            let values = self.list(dim);
            if !values.is_empty() {
                filters.push(((*dim).to_owned(), values));
            }
        }
        Ok(Selection { tenant, from, to, granularity, group_by, filters })
    }
}

type Pairs = Query<Vec<(String, String)>>;

/// Change versions per (tenant, dashboard).
type Versions = BTreeMap<(String, String), i64>;

/// The dimensions a report groups by and filters on.
fn dims_of(spec: &TableSpec) -> Vec<&'static str> {
    spec.dims.to_vec()
}

/// The range an answer covers.
fn range_json(sel: &Selection) -> serde_json::Value {
    serde_json::json!({
        "from": query::time_text(sel.from.div_euclid(60) * 60),
        "to": query::time_text(-(-sel.to).div_euclid(60) * 60),
        "granularity": sel.granularity.map(|g| match g { 60 => "minute", 3600 => "hour", _ => "day" }),
    })
}

fn with_range(sel: &Selection, body: serde_json::Value) -> Json<serde_json::Value> {
    let mut out = range_json(sel);
    if let (Some(o), serde_json::Value::Object(b)) = (out.as_object_mut(), body) {
        o.extend(b);
    }
    Json(out)
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    query(&state, |tx| tx.query("SELECT 1", &[])).await.map(|_| "ready")
}

#[utoipa::path(get, path = "/api/v1/sales", tag = "sales",
    params(openapi::RangeParams, ("channel" = Option<String>, Query, description = "filter: any of these comma-separated values"), ("site" = Option<String>, Query, description = "filter: any of these comma-separated values"), ("country" = Option<String>, Query, description = "filter: any of these comma-separated values"), ("currency" = Option<String>, Query, description = "filter: any of these comma-separated values")),
    responses((status = 200, description = "Orders, revenue, AOV, units, cancellations, refunds", body = openapi::SalesReport), openapi::Refusals))]
async fn sales(State(state): State<AppState>, Query(p): Pairs) -> Result<Json<serde_json::Value>, ApiError> {
    let mut p = Params::new(p)?;
    let sel = p.selection(&dims_of(&tables::SALES), 86_400)?;
    p.done()?;
    let s = sel.clone();
    let rows = query(&state, move |tx| query::sales(tx, &s)).await?;
    Ok(with_range(&sel, serde_json::json!({ "rows": rows })))
}

#[utoipa::path(get, path = "/api/v1/sales/totals", tag = "sales",
    params(("tenant" = Option<String>, Query, description = "one tenant")),
    responses((status = 200, description = "All time, per channel and currency", body = Vec<query::SalesRow>), openapi::Refusals))]
async fn sales_totals(State(state): State<AppState>, Query(p): Pairs) -> Result<Json<Vec<query::SalesRow>>, ApiError> {
    let mut p = Params::new(p)?;
    let tenant = p.take("tenant");
    p.done()?;
    query(&state, move |tx| query::sales_totals(tx, tenant.as_deref())).await.map(Json)
}

#[utoipa::path(get, path = "/api/v1/sales/products", tag = "sales",
    params(openapi::RangeParams, ("sort" = Option<String>, Query, description = "`revenue` (default) or `units`"), ("limit" = Option<i64>, Query, description = "1 to 10 000, default 10"), ("sku" = Option<String>, Query, description = "filter: any of these comma-separated values"), ("currency" = Option<String>, Query, description = "filter: any of these comma-separated values")),
    responses((status = 200, description = "Top products over the range (kept per hour)", body = openapi::ProductsReport), openapi::Refusals))]
async fn products(State(state): State<AppState>, Query(p): Pairs) -> Result<Json<serde_json::Value>, ApiError> {
    let mut p = Params::new(p)?;
    let sel = p.selection(&dims_of(&tables::PRODUCTS), 86_400)?.widened(tables::PRODUCTS.finest);
    let by_units = match p.take("sort").as_deref() {
        None | Some("revenue") => false,
        Some("units") => true,
        Some(other) => return Err(bad(format!("sort={other:?}: expected revenue or units"))),
    };
    let limit = p.number("limit", 1, 10_000)?.unwrap_or(10) as usize;
    p.done()?;
    if sel.granularity.is_some() || !sel.group_by.is_empty() {
        return Err(bad("granularity and group_by do not apply to top products".into()));
    }
    let s = sel.clone();
    let rows = query(&state, move |tx| query::products(tx, &s, by_units, limit)).await?;
    Ok(with_range(&sel, serde_json::json!({ "sort": if by_units { "units" } else { "revenue" }, "rows": rows })))
}

#[utoipa::path(get, path = "/api/v1/behavior", tag = "behavior",
    params(openapi::RangeParams, ("referrer" = Option<String>, Query, description = "filter: any of these comma-separated values")),
    responses((status = 200, description = "Sessions, bounce rate, duration, events per type, page views", body = openapi::BehaviorReport), openapi::Refusals))]
async fn behavior(State(state): State<AppState>, Query(p): Pairs) -> Result<Json<serde_json::Value>, ApiError> {
    let mut p = Params::new(p)?;
    let sel = p.selection(&["referrer"], 86_400)?;
    p.done()?;
    let s = sel.clone();
    let report = query(&state, move |tx| query::behavior(tx, &s)).await?;
    Ok(with_range(&sel, serde_json::to_value(report).unwrap_or_default()))
}

fn steps(p: &mut Params, cfg: &AnalyticsConfig) -> Result<Vec<String>, ApiError> {
    let steps = p.list("steps");
    if steps.is_empty() {
        return Ok(cfg.funnel_steps.clone());
    }
    for s in &steps {
        if crate::analytics::sessions::kind_by_name(s).is_none() {
            return Err(bad(format!("steps: {s:?} is not one of {}", query::kind_names().join(", "))));
        }
    }
    Ok(steps)
}

#[utoipa::path(get, path = "/api/v1/behavior/funnel", tag = "behavior",
    params(openapi::RangeParams, ("steps" = Option<String>, Query, description = "comma-separated behavior types (default: the configured funnel)"), ("referrer" = Option<String>, Query, description = "filter: any of these comma-separated values")),
    responses((status = 200, description = "Sessions per step, step and overall conversion", body = openapi::FunnelReport), openapi::Refusals))]
async fn funnel(State(state): State<AppState>, Query(p): Pairs) -> Result<Json<serde_json::Value>, ApiError> {
    let mut p = Params::new(p)?;
    let sel = p.selection(&["referrer"], 86_400)?;
    let steps = steps(&mut p, &state.analytics)?;
    p.done()?;
    if sel.granularity.is_some() || !sel.group_by.is_empty() {
        return Err(bad("granularity and group_by do not apply to the funnel".into()));
    }
    let s = sel.clone();
    let report = query(&state, move |tx| query::funnel(tx, &s, &steps)).await?;
    Ok(with_range(&sel, serde_json::to_value(report).unwrap_or_default()))
}

fn model(p: &mut Params) -> Result<Model, ApiError> {
    match p.take("model") {
        None => Ok(Model::LastTouch),
        Some(m) => Model::by_name(&m).ok_or_else(|| {
            let names: Vec<&str> = Model::ALL.iter().map(|m| m.name()).collect();
            bad(format!("model={m:?}: expected one of {}", names.join(", ")))
        }),
    }
}

#[utoipa::path(get, path = "/api/v1/marketing/attribution", tag = "marketing",
    params(openapi::RangeParams, ("model" = Option<String>, Query, description = "`last_touch` (default), `first_touch`, `linear`, `time_decay`, `position_based`"), ("channel" = Option<String>, Query, description = "filter: any of these comma-separated values"), ("campaign" = Option<String>, Query, description = "filter: any of these comma-separated values"), ("currency" = Option<String>, Query, description = "filter: any of these comma-separated values")),
    responses((status = 200, description = "Attributed orders and revenue, cost, ROAS (kept per hour)", body = openapi::AttributionReport), openapi::Refusals))]
async fn attribution(State(state): State<AppState>, Query(p): Pairs) -> Result<Json<serde_json::Value>, ApiError> {
    let mut p = Params::new(p)?;
    let sel = p.selection(&["channel", "campaign", "currency"], 86_400)?.widened(tables::ATTRIBUTION.finest);
    let model = model(&mut p)?;
    p.done()?;
    if sel.granularity.is_some_and(|g| g < tables::ATTRIBUTION.finest) {
        return Err(bad("granularity=minute: attribution is kept per hour; use hour or day".into()));
    }
    if sel.group_by.iter().any(|g| g == "currency") {
        return Err(bad("group_by: attribution is always grouped by currency; use channel and/or campaign".into()));
    }
    let s = sel.clone();
    let report = query(&state, move |tx| query::attribution(tx, &s, model)).await?;
    Ok(with_range(&sel, serde_json::to_value(report).unwrap_or_default()))
}

#[utoipa::path(get, path = "/api/v1/inventory", tag = "inventory",
    params(("tenant" = Option<String>, Query, description = "one tenant"), ("threshold" = Option<i64>, Query, description = "low stock below this (default: configured)"), ("as_of" = Option<String>, Query, description = "days of cover up to this time (default: now)"), ("limit" = Option<i64>, Query, description = "rows per list, default 100"), ("sku" = Option<String>, Query, description = "filter: any of these comma-separated values"), ("warehouse" = Option<String>, Query, description = "filter: any of these comma-separated values")),
    responses((status = 200, description = "Latest on-hand, low stock, days of cover", body = query::Inventory), openapi::Refusals))]
async fn inventory(State(state): State<AppState>, Query(p): Pairs) -> Result<Json<query::Inventory>, ApiError> {
    let mut p = Params::new(p)?;
    let tenant = p.take("tenant");
    let threshold = p.number("threshold", i64::MIN, i64::MAX)?.unwrap_or(state.analytics.low_stock_threshold);
    let as_of = p.time("as_of")?.unwrap_or_else(|| chrono::Utc::now().timestamp());
    let limit = p.number("limit", 1, 10_000)?.unwrap_or(100) as usize;
    let mut filters = Vec::new();
    for dim in ["sku", "warehouse"] {
        let values = p.list(dim);
        if !values.is_empty() {
            filters.push((dim.to_owned(), values));
        }
    }
    p.done()?;
    query(&state, move |tx| query::inventory(tx, tenant.as_deref(), &filters, threshold, as_of, limit)).await.map(Json)
}

#[utoipa::path(get, path = "/api/v1/events", tag = "fleet",
    params(openapi::RangeParams, ("domain" = Option<String>, Query, description = "filter: any of these comma-separated values")),
    responses((status = 200, description = "Events per domain", body = openapi::EventsReport), openapi::Refusals))]
async fn events(State(state): State<AppState>, Query(p): Pairs) -> Result<Json<serde_json::Value>, ApiError> {
    let mut p = Params::new(p)?;
    let mut sel = p.selection(&dims_of(&tables::DOMAINS), 86_400)?;
    p.done()?;
    if !sel.group_by.iter().any(|g| g == "domain") {
        sel.group_by.push("domain".into());
    }
    let s = sel.clone();
    let rows = query(&state, move |tx| query::rollup(tx, &tables::DOMAINS, &s)).await?;
    let rows: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|r| {
            let mut o = serde_json::json!({ "tenant": r.tenant, "events": r.metrics[0] });
            if let Some(b) = r.bucket {
                o["bucket"] = query::time_text(b).into();
            }
            for (g, v) in sel.group_by.iter().zip(r.dims) {
                o[g] = v.into();
            }
            o
        })
        .collect();
    Ok(with_range(&sel, serde_json::json!({ "rows": rows })))
}

#[utoipa::path(get, path = "/api/v1/agents", tag = "fleet",
    params(("tenant" = Option<String>, Query, description = "one tenant")),
    responses((status = 200, description = "Each agent's last heartbeat (role ops)", body = Vec<query::AgentRow>), openapi::Refusals))]
async fn agents(State(state): State<AppState>, Query(p): Pairs) -> Result<Json<Vec<query::AgentRow>>, ApiError> {
    let mut p = Params::new(p)?;
    let tenant = p.take("tenant");
    p.done()?;
    query(&state, move |tx| query::agents(tx, tenant.as_deref())).await.map(Json)
}

/// One agent in the fleet report.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct FleetAgent {
    tenant: String,
    agent_id: String,
    /// Its state now, why, and since when.
    health: crate::health::Health,
    /// When its last heartbeat arrived (RFC 3339).
    last_heartbeat: String,
    transport: String,
    remote_addr: String,
    agent_version: String,
    uptime_secs: u64,
    spool_events: u64,
    spool_bytes: u64,
    spool_max_bytes: u64,
    /// Its last time without the cloud (cut off), as it reported it.
    #[schema(value_type = Option<Object>)]
    last_outage: Option<actidash_shared::wire::Outage>,
    /// Central configuration, for an agent that takes it from the cloud: its group, the version
    /// it runs, `applied`/`trial`/`rolled_back`/`refused`/`local`, the last failed version and
    /// its error.
    #[schema(value_type = Option<Object>)]
    config: Option<actidash_shared::wire::ConfigState>,
    /// Each source: state, position, lag (`lag_ms`), counts of events, bad records, drops,
    /// refusals and skips, last error.
    #[schema(value_type = Vec<Object>)]
    sources: Vec<actidash_shared::wire::SourceStatus>,
}

/// The fleet (`/api/v1/fleet`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct FleetReport {
    as_of: String,
    /// An agent silent this long is offline.
    offline_after_secs: i64,
    agents: Vec<FleetAgent>,
}

#[utoipa::path(get, path = "/api/v1/fleet", tag = "fleet",
    params(("tenant" = Option<String>, Query, description = "one tenant")),
    responses((status = 200, description = "Every agent's health (healthy, degraded, offline, revoked, with reasons), spool and sources (role ops)", body = FleetReport), openapi::Refusals))]
async fn fleet_report(State(state): State<AppState>, Query(p): Pairs) -> Result<Json<FleetReport>, ApiError> {
    let mut p = Params::new(p)?;
    let tenant = p.take("tenant");
    p.done()?;
    let now = chrono::Utc::now();
    let registry = state.admin.fleet.clone();
    let revoked = tokio::task::spawn_blocking(move || registry.revoked())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("the fleet registry: {e:#}")))?;
    let rows = query(&state, move |tx| query::fleet(tx, tenant.as_deref())).await?;
    let offline_after = state.admin.agent_offline_after;
    let agents = rows
        .into_iter()
        .map(|row| {
            let (a, hb, health) = crate::health::of_row(row, &revoked, now, offline_after);
            FleetAgent {
                tenant: a.tenant,
                agent_id: a.agent_id,
                health,
                last_heartbeat: a.received_at,
                transport: a.transport,
                remote_addr: a.remote_addr,
                agent_version: hb.agent_version,
                uptime_secs: hb.uptime_secs,
                spool_events: hb.spool_events,
                spool_bytes: hb.spool_bytes,
                spool_max_bytes: hb.spool_max_bytes,
                last_outage: hb.last_outage,
                config: hb.config,
                sources: hb.sources,
            }
        })
        .collect();
    Ok(Json(FleetReport {
        as_of: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        offline_after_secs: offline_after.num_seconds(),
        agents,
    }))
}

#[utoipa::path(get, path = "/api/v1/fleet/history", tag = "fleet",
    params(("tenant" = String, Query, description = "the agent's tenant"), ("agent" = String, Query, description = "the agent's id"),
        ("limit" = Option<i64>, Query, description = "most changes, newest first (default 100, at most 10 000)")),
    responses((status = 200, description = "The changes of an agent's health: when it went degraded or was cut off or offline, why, and when it recovered (role ops)", body = Vec<crate::health::Change>), openapi::Refusals))]
async fn fleet_history(
    State(state): State<AppState>,
    Query(p): Pairs,
) -> Result<Json<Vec<crate::health::Change>>, ApiError> {
    let mut p = Params::new(p)?;
    let tenant = p.take("tenant").ok_or_else(|| bad("tenant is required".into()))?;
    let agent = p.take("agent").ok_or_else(|| bad("agent is required".into()))?;
    let limit = p.number("limit", 1, 10_000)?.unwrap_or(100);
    p.done()?;
    query(&state, move |tx| query::health_history(tx, &tenant, &agent, limit)).await.map(Json)
}

/// The alerts a token may see (`alerts.rs`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct AlertsReport {
    /// When they were derived.
    as_of: String,
    /// The low-stock threshold used.
    threshold: i64,
    /// Whether agent alerts are included (role ops and above).
    fleet: bool,
    alerts: Vec<alerts::Alert>,
}

#[utoipa::path(get, path = "/api/v1/alerts", tag = "fleet",
    params(("tenant" = Option<String>, Query, description = "one tenant"), ("threshold" = Option<i64>, Query, description = "low stock below this (default: configured)")),
    responses((status = 200, description = "What needs attention now: low stock (any role); agents offline, a source stopped on an error, a full spool (role ops)", body = AlertsReport), openapi::Refusals))]
async fn alerts(
    State(state): State<AppState>,
    grant: Option<axum::Extension<auth::Grant>>,
    Query(p): Pairs,
) -> Result<Json<AlertsReport>, ApiError> {
    let mut p = Params::new(p)?;
    let tenant = p.take("tenant");
    let threshold = p.number("threshold", i64::MIN, i64::MAX)?.unwrap_or(state.analytics.low_stock_threshold);
    p.done()?;
    let fleet = grant.is_some_and(|g| g.role >= crate::api_tokens::Role::Ops);
    let now = chrono::Utc::now();
    let registry = state.admin.fleet.clone();
    let revoked = if fleet {
        tokio::task::spawn_blocking(move || registry.revoked())
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("the fleet registry: {e:#}")))?
    } else {
        Default::default()
    };
    let offline_after = state.admin.agent_offline_after;
    let list = query(&state, move |tx| {
        let stock = query::inventory(tx, tenant.as_deref(), &[], threshold, now.timestamp(), 10_000)?;
        let agents = if fleet { query::agents(tx, tenant.as_deref())? } else { Vec::new() };
        Ok(alerts::derive(&stock.low_stock, threshold, fleet.then_some((&agents[..], &revoked)), now, offline_after))
    })
    .await?;
    Ok(Json(AlertsReport {
        as_of: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        threshold,
        fleet,
        alerts: list,
    }))
}

#[utoipa::path(get, path = "/api/v1/stats", tag = "fleet",
    responses((status = 200, description = "The service's counters and analytics state size (role ops, a token for every tenant)", body = Object), openapi::Refusals))]
async fn stats(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    query(&state, |tx| {
        let mut out = serde_json::to_value(query::counters(tx)?).unwrap_or_default();
        out["state_rows"] = serde_json::to_value(query::state_sizes(tx)?).unwrap_or_default();
        Ok(out)
    })
    .await
    .map(Json)
}

/// The figures of the dashboards in `which` for a live subscriber.
fn live_update(
    tx: &mut dyn crate::store::db::Tx,
    sel: &Selection,
    model: Model,
    cfg: &AnalyticsConfig,
    which: &BTreeSet<String>,
    with_stats: bool,
) -> Result<serde_json::Value, DbError> {
    let mut out = range_json(sel);
    out["changed"] = serde_json::to_value(which).unwrap_or_default();
    out["as_of"] = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true).into();
    let totals = Selection { granularity: None, group_by: vec![], ..sel.clone() };
    if which.contains("sales") {
        let by_channel = Selection { group_by: vec!["channel".into(), "currency".into()], ..totals.clone() };
        out["sales"] = serde_json::json!({
            "totals": query::sales(tx, &by_channel)?,
            "series": query::sales(tx, &Selection { group_by: vec!["currency".into()], ..sel.clone() })?,
            "top_products": query::products(tx, &totals, false, 10)?,
        });
    }
    if which.contains("behavior") {
        out["behavior"] = serde_json::json!({
            "totals": query::behavior(tx, &totals)?,
            "series": query::behavior(tx, sel)?.sessions,
            "funnel": query::funnel(tx, &totals, &cfg.funnel_steps)?,
        });
    }
    if which.contains("marketing") || which.contains("sales") {
        let by_channel = Selection { group_by: vec!["channel".into()], ..totals.clone() };
        out["marketing"] = serde_json::to_value(query::attribution(tx, &by_channel, model)?).unwrap_or_default();
    }
    if which.contains("inventory") {
        let now = chrono::Utc::now().timestamp();
        out["inventory"] =
            serde_json::to_value(query::inventory(tx, sel.tenant.as_deref(), &[], cfg.low_stock_threshold, now, 100)?)
                .unwrap_or_default();
    }
    if which.contains("fleet") {
        out["fleet"] = serde_json::to_value(query::agents(tx, sel.tenant.as_deref())?).unwrap_or_default();
    }
    let domains = Selection { group_by: vec!["domain".into()], ..totals };
    let events: BTreeMap<String, i64> =
        query::rollup(tx, &tables::DOMAINS, &domains)?.into_iter().map(|r| (r.dims[0].clone(), r.metrics[0])).collect();
    out["events"] = serde_json::to_value(events).unwrap_or_default();
    if with_stats {
        out["stats"] = serde_json::to_value(query::counters(tx)?).unwrap_or_default();
    }
    Ok(out)
}

/// Server-sent events: first an `update` with every dashboard, then one whenever a dashboard's
/// figures change (at most one per 250 ms), carrying only the dashboards that changed. Takes
/// the common parameters (the range is re-read relative to now when `to` is not given) and
/// `model` for the attribution figures.
#[utoipa::path(get, path = "/api/v1/live", tag = "live",
    params(openapi::RangeParams, ("model" = Option<String>, Query, description = "attribution model of the pushed figures"), ("access_token" = Option<String>, Query, description = "the token, for clients that cannot send headers")),
    responses((status = 200, description = "Server-sent events: `update`, with the dashboards that changed and their figures", content_type = "text/event-stream", body = String), openapi::Refusals))]
async fn live(
    State(state): State<AppState>,
    grant: Option<axum::Extension<auth::Grant>>,
    Query(p): Pairs,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    // The fleet needs ops; the service's counters a token for every tenant (as their routes).
    let grant = grant.map(|g| g.0);
    let fleet_ok = grant.as_ref().is_some_and(|g| g.role >= crate::api_tokens::Role::Ops);
    let stats_ok = fleet_ok && grant.as_ref().is_some_and(|g| g.tenant.is_none());
    let mut p = Params::new(p)?;
    let fixed_to = p.0.contains_key("to");
    let default_range = 86_400;
    let sel = p.selection(&["currency"], default_range)?;
    let model = model(&mut p)?;
    p.done()?;
    let span = sel.to - sel.from;
    let changes = WatchStream::new(state.changes.clone());
    let seen: Arc<Mutex<Option<Versions>>> = Arc::new(Mutex::new(None));
    let stream = changes.throttle(Duration::from_millis(250)).then(move |_| {
        let (state, seen, mut sel) = (state.clone(), seen.clone(), sel.clone());
        async move {
            if !fixed_to {
                sel.to = chrono::Utc::now().timestamp() + 60;
                sel.from = sel.to - span;
            }
            let cfg = state.analytics.clone();
            let result = query(&state, move |tx| {
                let versions = query::changes(tx)?;
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                let mut which: BTreeSet<String> = match seen.as_ref() {
                    None => ["sales", "behavior", "marketing", "inventory", "fleet"].map(String::from).into(),
                    Some(old) => versions
                        .iter()
                        .filter(|((t, _), _)| sel.tenant.as_ref().is_none_or(|want| want == t))
                        .filter(|(k, v)| old.get(*k) != Some(*v))
                        .map(|((_, d), _)| d.clone())
                        .collect(),
                };
                if !fleet_ok {
                    which.remove("fleet");
                }
                *seen = Some(versions);
                if which.is_empty() {
                    return Ok(None);
                }
                live_update(tx, &sel, model, &cfg, &which, stats_ok).map(Some)
            })
            .await;
            match result {
                Ok(Some(update)) => Some(SseEvent::default().event("update").json_data(&update).unwrap_or_default()),
                Ok(None) => None,
                Err(ApiError(_, message)) => Some(SseEvent::default().event("error").data(message)),
            }
        }
    });
    let stream = stream.filter_map(|e| e.map(Ok));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
