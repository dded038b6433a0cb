//! The HTTP API (axum): roll-ups, fleet health, counters, live push, and the dashboard page.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | the process is up |
//! | `GET /readyz` | the serving store answers (503 otherwise) |
//! | `GET /api/v1/sales/totals?tenant=` | orders, revenue, AOV per channel and currency |
//! | `GET /api/v1/sales/minutes?tenant=&since=` | the same per minute (`since`: RFC 3339 or unix seconds; default: last hour) |
//! | `GET /api/v1/events/minutes?tenant=&since=` | events per domain per minute |
//! | `GET /api/v1/agents?tenant=` | each agent's last heartbeat |
//! | `GET /api/v1/stats` | processing counters |
//! | `GET /api/v1/live?tenant=` | server-sent events: a `snapshot` whenever the store changes |
//! | `GET /` | the dashboard |
//!
//! The API reads the store through its own read-only connection; it learns of new data from
//! SQLite's `data_version`, so it works the same whether the processor runs in this process or
//! in another one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use axum::{Router, serve};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::{AgentRow, DomainRow, SalesRow, Store, TotalsRow};

const DASHBOARD: &str = include_str!("dashboard.html");

#[derive(Clone)]
struct AppState {
    store: Arc<Mutex<Store>>,
    changes: watch::Receiver<i64>,
}

/// Common query parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Filter {
    tenant: Option<String>,
    since: Option<String>,
}

/// What the live stream pushes.
#[derive(Debug, Serialize)]
struct Snapshot {
    totals: Vec<TotalsRow>,
    minutes: Vec<SalesRow>,
    domains: Vec<DomainRow>,
    agents: Vec<AgentRow>,
    counters: std::collections::BTreeMap<String, i64>,
}

/// An API error, as JSON with a status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// Serves the API on `listen` until shutdown.
pub async fn run(listen: SocketAddr, store_path: PathBuf, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding the API to tcp/{listen}"))?;
    run_on(listener, store_path, shutdown).await
}

/// Serves the API on a bound listener until shutdown.
pub async fn run_on(
    listener: tokio::net::TcpListener,
    store_path: PathBuf,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The writer creates the schema; make sure it exists even if the API starts first.
    drop(Store::open(&store_path)?);
    let store = Store::open_read_only(&store_path)?;
    let (tx, rx) = watch::channel(store.data_version()?);
    let state = AppState { store: Arc::new(Mutex::new(store)), changes: rx };
    tokio::spawn(watch_changes(state.store.clone(), tx, shutdown.clone()));
    let app = Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/sales/totals", get(sales_totals))
        .route("/api/v1/sales/minutes", get(sales_minutes))
        .route("/api/v1/events/minutes", get(domain_minutes))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/live", get(live))
        .with_state(state);
    info!(listen = %listener.local_addr()?, "API listening (HTTP)");
    serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("serving the API")?;
    info!("API stopped");
    Ok(())
}

/// Polls the store's data version and publishes changes.
async fn watch_changes(store: Arc<Mutex<Store>>, tx: watch::Sender<i64>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.lock().unwrap_or_else(|p| p.into_inner()).data_version()).await
        {
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
    f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || f(&store.lock().unwrap_or_else(|p| p.into_inner())))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

fn since(filter: &Filter) -> Result<i64, ApiError> {
    let default = chrono::Utc::now().timestamp() - 3600;
    match filter.since.as_deref() {
        None => Ok(default),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .or_else(|| chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp()))
            .ok_or_else(|| {
                ApiError(StatusCode::BAD_REQUEST, format!("since={s:?}: expected RFC 3339 or unix seconds"))
            }),
    }
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    query(&state, |s| s.data_version()).await.map(|_| "ready")
}

async fn sales_totals(
    State(state): State<AppState>,
    Query(f): Query<Filter>,
) -> Result<Json<Vec<TotalsRow>>, ApiError> {
    query(&state, move |s| s.sales_totals(f.tenant.as_deref())).await.map(Json)
}

async fn sales_minutes(
    State(state): State<AppState>,
    Query(f): Query<Filter>,
) -> Result<Json<Vec<SalesRow>>, ApiError> {
    let since = since(&f)?;
    query(&state, move |s| s.sales_minutes(f.tenant.as_deref(), since)).await.map(Json)
}

async fn domain_minutes(
    State(state): State<AppState>,
    Query(f): Query<Filter>,
) -> Result<Json<Vec<DomainRow>>, ApiError> {
    let since = since(&f)?;
    query(&state, move |s| s.domain_minutes(f.tenant.as_deref(), since)).await.map(Json)
}

async fn agents(State(state): State<AppState>, Query(f): Query<Filter>) -> Result<Json<Vec<AgentRow>>, ApiError> {
    query(&state, move |s| s.agents(f.tenant.as_deref())).await.map(Json)
}

async fn stats(State(state): State<AppState>) -> Result<Json<std::collections::BTreeMap<String, i64>>, ApiError> {
    query(&state, |s| s.counters()).await.map(Json)
}

async fn snapshot(state: &AppState, tenant: Option<String>) -> Result<Snapshot, ApiError> {
    let since = chrono::Utc::now().timestamp() - 30 * 60;
    query(state, move |s| {
        let t = tenant.as_deref();
        Ok(Snapshot {
            totals: s.sales_totals(t)?,
            minutes: s.sales_minutes(t, since)?,
            domains: s.domain_minutes(t, since)?,
            agents: s.agents(t)?,
            counters: s.counters()?,
        })
    })
    .await
}

async fn live(
    State(state): State<AppState>,
    Query(f): Query<Filter>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let changes = WatchStream::new(state.changes.clone());
    // At most one snapshot per 250 ms however fast the store changes.
    let stream = changes.throttle(Duration::from_millis(250)).then(move |_| {
        let state = state.clone();
        let tenant = f.tenant.clone();
        async move {
            let event = match snapshot(&state, tenant).await {
                Ok(s) => SseEvent::default().event("snapshot").json_data(&s).unwrap_or_default(),
                Err(ApiError(_, message)) => SseEvent::default().event("error").data(message),
            };
            Ok(event)
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
