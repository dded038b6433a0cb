//! The HTTP API over a real store and a real socket: the reports' shapes (money as decimal
//! text), parameters checked with a 400 that names the parameter, and the live push carrying
//! the dashboards that changed.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use actidash_shared::event::{Event, InventoryLevel, MarketingTouch, OrderStatus, Payload};
use actidash_shared::testing::sale_with;
use actidash_tests::harness::{http_call, http_get, http_get_auth};
use cloud_aggregator::api_tokens::{ApiTokens, Role};
use cloud_aggregator::serve::ServeOptions;
use cloud_aggregator::store::{CommitWork, Store, StreamInput};
use tokio_util::sync::CancellationToken;

fn commit(path: &Path, events: Vec<Event>) {
    let mut store = Store::open(path).unwrap();
    store
        .commit(CommitWork {
            inputs: vec![StreamInput { stream: "embedded".into(), events, offset: None }],
            ..Default::default()
        })
        .unwrap();
}

fn event(seq: u64, time: &str, payload: Payload) -> Event {
    Event::new("acme".into(), "a".into(), "s2".into(), seq, time.parse().unwrap(), payload)
}

/// An API server of a test, with its token registry and a token for every tenant.
struct Api {
    port: u16,
    shutdown: CancellationToken,
    tokens: ApiTokens,
    fleet: std::sync::Arc<cloud_aggregator::fleet::Fleet>,
    /// Role admin, every tenant.
    token: String,
    _rt: tokio::runtime::Runtime,
}

impl Api {
    fn json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&http_get_auth(self.port, path, Some(&self.token)).unwrap()).unwrap()
    }
}

/// Starts the API on a free port over `location`, its tokens in `data_dir`.
fn start_on(location: cloud_aggregator::store::Location, data_dir: &Path) -> Api {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = CancellationToken::new();
    let tokens = ApiTokens::open(data_dir, &Default::default()).unwrap();
    let (_, token) = tokens.create(None, Role::Admin, None, chrono::Utc::now().timestamp()).unwrap();
    let fleet = std::sync::Arc::new(
        cloud_aggregator::fleet::Fleet::open(data_dir, &cloud_aggregator::fleet::FleetConfig::default()).unwrap(),
    );
    let options = ServeOptions {
        tokens: tokens.clone(),
        ui_dir: None,
        cors_origins: vec![],
        rate_per_token: cloud_aggregator::serve::DEFAULT_RATE_PER_TOKEN,
        fleet: fleet.clone(),
        agent_offline_after: Duration::from_secs(60),
        header_read_timeout: Duration::from_millis(500),
        fleet_metrics: false,
    };
    rt.spawn(cloud_aggregator::serve::run_on(listener, location, Default::default(), options, shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(port, "/readyz").is_err() {
        assert!(Instant::now() < deadline, "the API did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Api { port, shutdown, tokens, fleet, token, _rt: rt }
}

/// Starts the API on a free port over the SQLite `store`.
fn start(store: &Path) -> Api {
    start_on(cloud_aggregator::store::Location::Sqlite(store.to_owned()), store.parent().unwrap())
}

#[test]
fn reports_serve_exact_money_and_refuse_bad_parameters_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serving.db");
    let mut events: Vec<Event> =
        (0..3).map(|s| sale_with("acme", "a", s, "2026-11-27T10:00:00Z", "web", "0.10", OrderStatus::Placed)).collect();
    // Order o2 is cancelled.
    let mut cancel = sale_with("acme", "a", 3, "2026-11-27T10:05:00Z", "web", "0.10", OrderStatus::Cancelled);
    if let Payload::Sales(o) = &mut cancel.payload {
        o.order_id = "o2".into();
    }
    cancel.entity_key = cancel.payload.entity_key();
    events.push(cancel);
    commit(&path, events);
    commit(
        &path,
        vec![
            event(
                0,
                "2026-11-27T09:00:00Z",
                Payload::Marketing(MarketingTouch {
                    user_id: "c".into(),
                    channel: "google".into(),
                    campaign: "bf".into(),
                    cost: Some(actidash_shared::Money::parse("0.05").unwrap()),
                    currency: Some("EUR".into()),
                }),
            ),
            event(
                1,
                "2026-11-27T09:00:00Z",
                Payload::Inventory(InventoryLevel { sku: "S".into(), warehouse: "W".into(), on_hand: 3 }),
            ),
        ],
    );
    let api = start(&path);
    let (port, shutdown) = (api.port, api.shutdown.clone());
    let range = "from=2026-11-27T00:00:00Z&to=2026-11-28T00:00:00Z";

    // 0.10 + 0.10 + 0.10 - 0.10, exactly: no float drift, and text rather than a number.
    let sales = api.json(&format!("/api/v1/sales?{range}&group_by=channel"));
    let row = &sales["rows"][0];
    assert_eq!((row["orders"].as_i64(), row["revenue"].as_str()), (Some(2), Some("0.2")), "{sales}");
    assert_eq!(row["average_order_value"], "0.1");
    assert_eq!(sales["from"], "2026-11-27T00:00:00Z");
    let series = api.json(&format!("/api/v1/sales?{range}&granularity=minute"));
    assert_eq!(series["rows"].as_array().unwrap().len(), 2, "two minutes with sales: {series}");

    // The orders were placed after the touch: all credited to it, with cost and ROAS.
    let attribution = api.json(&format!("/api/v1/marketing/attribution?{range}&model=linear&group_by=channel"));
    let google = attribution["rows"].as_array().unwrap().iter().find(|r| r["channel"] == "google").unwrap();
    assert_eq!(google["attributed_orders"], "2", "{attribution}");
    assert_eq!(google["attributed_revenue"], "0.2");
    assert_eq!(google["cost"], "0.05");
    assert_eq!(google["roas"], "4");
    let inventory = api.json("/api/v1/inventory?tenant=acme");
    assert_eq!(inventory["low_stock"][0]["sku"], "S", "{inventory}");

    // Attribution and products are kept per hour: a range inside an hour is widened to it, and
    // the answer says so.
    let within = "from=2026-11-27T10:01:00Z&to=2026-11-27T10:07:00Z";
    let attribution = api.json(&format!("/api/v1/marketing/attribution?{within}&model=last_touch"));
    assert_eq!(
        (attribution["from"].as_str(), attribution["to"].as_str()),
        (Some("2026-11-27T10:00:00Z"), Some("2026-11-27T11:00:00Z"))
    );
    assert_eq!(attribution["orders"], "2", "{attribution}");
    let products = api.json(&format!("/api/v1/sales/products?{within}"));
    assert_eq!(products["from"], "2026-11-27T10:00:00Z", "{products}");

    for (path, named) in [
        ("/api/v1/sales?granularity=week", "granularity"),
        ("/api/v1/sales?from=yesterday", "from"),
        ("/api/v1/sales?group_by=colour", "group_by"),
        ("/api/v1/sales?colour=red", "colour"),
        ("/api/v1/sales?from=2026-11-28T00:00:00Z&to=2026-11-27T00:00:00Z", "from"),
        ("/api/v1/marketing/attribution?model=u_shaped", "model"),
        ("/api/v1/marketing/attribution?granularity=minute", "granularity"),
        ("/api/v1/behavior/funnel?steps=page_view,teleport", "steps"),
        ("/api/v1/sales/products?limit=0", "limit"),
        ("/api/v1/inventory?threshold=low", "threshold"),
    ] {
        let err = http_get_auth(port, path, Some(&api.token)).unwrap_err().to_string();
        assert!(err.contains("HTTP 400") && err.contains(named), "{path}: {err}");
    }
    shutdown.cancel();
}

/// Reads server-sent events until an `update` arrives; returns its data.
fn next_update(reader: &mut BufReader<TcpStream>) -> serde_json::Value {
    let mut event = String::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the live stream ended");
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix("event:") {
            event = name.trim().to_owned();
        } else if let Some(data) = line.strip_prefix("data:")
            && event == "update"
        {
            return serde_json::from_str(data.trim()).unwrap();
        }
    }
}

#[test]
fn the_live_push_carries_the_dashboards_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serving.db");
    commit(&path, vec![sale_with("acme", "a", 0, "2026-11-27T10:00:00Z", "web", "5", OrderStatus::Placed)]);
    let api = start(&path);
    let (port, shutdown) = (api.port, api.shutdown.clone());
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // HTTP/1.0: the body is the raw event stream, not chunked.
    write!(
        &stream,
        "GET /api/v1/live?tenant=acme&from=2026-11-27T00:00:00Z&to=2026-11-28T00:00:00Z HTTP/1.0\r\nAuthorization: Bearer {}\r\n\r\n",
        api.token
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let first = next_update(&mut reader);
    assert_eq!(first["changed"], serde_json::json!(["behavior", "fleet", "inventory", "marketing", "sales"]));
    assert_eq!(first["sales"]["totals"][0]["revenue"], "5");

    // A stock level arrives: the next update carries the inventory only.
    commit(
        &path,
        vec![event(
            0,
            "2026-11-27T10:01:00Z",
            Payload::Inventory(InventoryLevel { sku: "S".into(), warehouse: "W".into(), on_hand: 7 }),
        )],
    );
    let update = next_update(&mut reader);
    assert_eq!(update["changed"], serde_json::json!(["inventory"]), "{update}");
    assert_eq!(update["inventory"]["total_on_hand"], 7);
    assert!(update.get("sales").is_none());
    shutdown.cancel();
}

/// The roles run inside the async runtime; the PostgreSQL store must work there (its client
/// refuses to run on a runtime's threads).
#[test]
fn the_api_and_the_embedded_processor_run_on_postgres() {
    let Some(admin) = actidash_tests::postgres_admin("api on postgres") else { return };
    let url = actidash_tests::fresh_postgres_database(&admin, "actidash_api_test").unwrap();
    let location = cloud_aggregator::store::Location::Postgres { url, password: None };
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The embedded processor, started from the runtime, commits a batch.
    let (tx, thread) = rt
        .block_on(async { cloud_aggregator::process::embedded::spawn(location.clone(), Default::default(), 4) })
        .unwrap();
    let (reply, done) = tokio::sync::oneshot::channel();
    let events = vec![sale_with("acme", "a", 0, "2026-11-27T10:00:00Z", "web", "12.5", OrderStatus::Placed)];
    rt.block_on(async {
        tx.send(cloud_aggregator::process::embedded::EmbeddedInput::Batch { connection: 1, events, reply })
            .await
            .unwrap();
        done.await.unwrap().unwrap();
    });
    // Two heartbeats: a source broken, then mended (the health history on PostgreSQL).
    for (at, state) in [("2026-11-27T10:00:00Z", "error"), ("2026-11-27T10:00:05Z", "running")] {
        let record = actidash_shared::kafka::FleetRecord {
            tenant: "acme".into(),
            agent_id: "a1".into(),
            received_at: at.parse().unwrap(),
            transport: "quic".into(),
            remote_addr: "127.0.0.1:9".into(),
            heartbeat: actidash_shared::wire::Heartbeat {
                sources: vec![actidash_shared::wire::SourceStatus {
                    source_id: "orders".into(),
                    state: state.into(),
                    last_error: Some("orders.db: no such file".into()),
                    ..Default::default()
                }],
                ..Default::default()
            },
        };
        rt.block_on(tx.send(cloud_aggregator::process::embedded::EmbeddedInput::Fleet(Box::new(record)))).unwrap();
    }
    drop(tx);
    thread.join().unwrap();
    // The API reads it.
    let dir = tempfile::tempdir().unwrap();
    let api = start_on(location, dir.path());
    let totals = api.json("/api/v1/sales/totals");
    assert_eq!(totals[0]["revenue"], "12.5", "{totals}");
    let history = api.json("/api/v1/fleet/history?tenant=acme&agent=a1");
    let states: Vec<&str> = history.as_array().unwrap().iter().map(|c| c["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["healthy", "degraded"], "newest first: {history}");
    assert_eq!(history[1]["reasons"][0]["code"], "source_error");
    let fleet = api.json("/api/v1/fleet");
    assert_eq!(fleet["agents"][0]["health"]["state"], "offline", "its heartbeats are days old: {fleet}");
    api.shutdown.cancel();
}

/// The status line's code of a GET (with an optional bearer token).
fn status(port: u16, path: &str, token: Option<&str>) -> u16 {
    match http_get_auth(port, path, token) {
        Ok(_) => 200,
        Err(e) => {
            let text = e.to_string();
            text.split("HTTP ").nth(1).and_then(|r| r.get(..3)).and_then(|c| c.parse().ok()).unwrap_or(0)
        }
    }
}

#[test]
fn every_route_refuses_missing_wrong_expired_revoked_and_foreign_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serving.db");
    commit(&path, vec![sale_with("acme", "a", 0, "2026-11-27T10:00:00Z", "web", "5", OrderStatus::Placed)]);
    commit(&path, vec![sale_with("other", "b", 0, "2026-11-27T10:00:00Z", "web", "7", OrderStatus::Placed)]);
    let api = start(&path);
    let now = chrono::Utc::now().timestamp();
    let make = |role, ttl: Option<u64>, created: i64| {
        api.tokens.create(Some("acme"), role, ttl.map(Duration::from_secs), created).unwrap()
    };
    let (_, viewer) = make(Role::Viewer, None, now);
    let (_, ops) = make(Role::Ops, None, now);
    let (_, expired) = make(Role::Admin, Some(5), now - 10);
    let (revoked_id, revoked) = make(Role::Admin, None, now);
    assert!(api.tokens.revoke(&revoked_id, now).unwrap());
    let routes = [
        "/api/v1/sales",
        "/api/v1/sales/totals",
        "/api/v1/sales/products",
        "/api/v1/behavior",
        "/api/v1/behavior/funnel",
        "/api/v1/marketing/attribution",
        "/api/v1/inventory",
        "/api/v1/events",
        "/api/v1/agents",
        "/api/v1/fleet",
        "/api/v1/alerts",
        "/api/v1/stats",
        "/api/v1/live",
        "/api/v1/me",
        "/api/v1/tokens",
    ];
    for route in routes {
        for (token, what) in [
            (None, "no token"),
            (Some("adk_0000"), "a wrong token"),
            (Some(&*expired), "an expired token"),
            (Some(&*revoked), "a revoked token"),
        ] {
            assert_eq!(status(api.port, route, token), 401, "{route} with {what}");
        }
        let foreign = format!("{route}?tenant=other");
        assert_eq!(status(api.port, &foreign, Some(&ops)), 403, "{foreign} with a token of acme");
    }
    // Roles: the fleet needs ops; the service's counters need a token for every tenant.
    assert_eq!(status(api.port, "/api/v1/agents", Some(&viewer)), 403);
    assert_eq!(status(api.port, "/api/v1/agents", Some(&ops)), 200);
    for fleet in ["/api/v1/fleet", "/api/v1/fleet/history?agent=a1"] {
        assert_eq!(status(api.port, fleet, Some(&viewer)), 403, "{fleet}");
        assert_eq!(status(api.port, fleet, Some(&ops)), 200, "{fleet}: the token's tenant is implied");
    }
    assert_eq!(status(api.port, "/api/v1/fleet/history?tenant=other&agent=a1", Some(&ops)), 403);
    assert_eq!(status(api.port, "/api/v1/stats", Some(&ops)), 403);
    assert_eq!(status(api.port, "/api/v1/stats", Some(&api.token)), 200);
    // A token sees its tenant only, named or not.
    let mine = http_get_auth(api.port, "/api/v1/sales/totals", Some(&viewer)).unwrap();
    let rows: serde_json::Value = serde_json::from_str(&mine).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["revenue"], "5");
    assert_eq!(status(api.port, "/api/v1/sales/totals?tenant=acme", Some(&viewer)), 200);
    assert_eq!(api.json("/api/v1/sales/totals").as_array().unwrap().len(), 2, "a token for every tenant sees both");
    // The open routes, and the live push's token in the query (and nowhere else).
    assert_eq!(status(api.port, "/healthz", None), 200);
    assert_eq!(status(api.port, "/readyz", None), 200);
    assert_eq!(status(api.port, &format!("/api/v1/sales?access_token={viewer}"), None), 401);
    let stream = TcpStream::connect(("127.0.0.1", api.port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let range = "from=2026-11-27T00:00:00Z&to=2026-11-28T00:00:00Z";
    write!(&stream, "GET /api/v1/live?access_token={viewer}&{range} HTTP/1.0\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let update = next_update(&mut reader);
    assert_eq!(update["sales"]["totals"].as_array().unwrap().len(), 1, "the live push is scoped too: {update}");
    assert_eq!(update["sales"]["totals"][0]["revenue"], "5");
    assert!(update.get("fleet").is_none() && update.get("stats").is_none(), "a viewer's push has no fleet: {update}");
    // A revocation is honoured within the grant cache's life.
    let (id, soon_revoked) = make(Role::Viewer, None, now);
    assert_eq!(status(api.port, "/api/v1/events", Some(&soon_revoked)), 200);
    api.tokens.revoke(&id, now).unwrap();
    std::thread::sleep(Duration::from_millis(2_100));
    assert_eq!(status(api.port, "/api/v1/events", Some(&soon_revoked)), 401);
    api.shutdown.cancel();
}

/// The OpenAPI document is made from the same registrations as the routes: every route is in
/// it, and everything in it is a route that answers.
#[test]
fn the_openapi_document_lists_every_route_and_only_routes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serving.db");
    commit(&path, vec![sale_with("acme", "a", 0, "2026-11-27T10:00:00Z", "web", "5", OrderStatus::Placed)]);
    let api = start(&path);
    // Behind a token, like every /api route.
    assert_eq!(status(api.port, "/api/v1/openapi.json", None), 401);
    let doc: serde_json::Value =
        serde_json::from_str(&http_get_auth(api.port, "/api/v1/openapi.json", Some(&api.token)).unwrap()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let paths: Vec<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let mut expected = vec![
        "/api/v1/agents",
        "/api/v1/agents/{id}/revoke",
        "/api/v1/alerts",
        "/api/v1/me",
        "/api/v1/tokens",
        "/api/v1/tokens/{id}",
        "/api/v1/behavior",
        "/api/v1/behavior/funnel",
        "/api/v1/events",
        "/api/v1/fleet",
        "/api/v1/fleet/history",
        "/api/v1/inventory",
        "/api/v1/live",
        "/api/v1/marketing/attribution",
        "/api/v1/sales",
        "/api/v1/sales/products",
        "/api/v1/sales/totals",
        "/api/v1/stats",
    ];
    expected.sort();
    assert_eq!(paths, expected);
    let mut operations = 0;
    for p in &paths {
        for (method, op) in doc["paths"][p].as_object().unwrap() {
            operations += 1;
            let ok = if method == "post" && p == "/api/v1/tokens" { "201" } else { "200" };
            assert!(op["responses"][ok].is_object() && op["responses"]["401"].is_object(), "{method} {p}: {op}");
            let method = method.to_uppercase();
            // Each documented operation is a route that asks for a token.
            let unknown = p.replace("{id}", "nope");
            let (code, body) = http_call(api.port, &method, &unknown, None, None).unwrap();
            assert_eq!(code, 401, "{method} {p} is documented as needing a token: {body}");
            if method != "GET" || p == "/api/v1/live" {
                continue; // a change, or a stream: checked in their own tests
            }
            // The routes with required parameters, given them.
            let with = if p == "/api/v1/fleet/history" { format!("{p}?tenant=acme&agent=a") } else { p.clone() };
            http_get_auth(api.port, &with, Some(&api.token)).unwrap_or_else(|e| panic!("{p} is documented but: {e}"));
        }
    }
    assert_eq!(operations, expected.len() + 1, "one operation per path, two on /tokens (GET, POST)");
    // An operation that is not documented is not served: a 405 from the router.
    let (code, _) = http_call(api.port, "DELETE", "/api/v1/sales", Some(&api.token), None).unwrap();
    assert_eq!(code, 405);
    // Every reference resolves, and the report types are described, money as text.
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                    out.push(r.to_owned());
                }
                m.values().for_each(|v| refs(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{r}"));
        assert!(doc["components"]["schemas"][name].is_object(), "{r} is not in the document");
    }
    let sales_row = doc["components"]["schemas"]["SalesRow"].to_string();
    assert!(
        sales_row.contains(r#""revenue":{"description":"Gross − cancelled − refunded amounts.","type":"string"}"#),
        "{sales_row}"
    );
    api.shutdown.cancel();
}

/// A POST or DELETE with a token and an optional JSON body: the status and the answer.
fn call(api: &Api, method: &str, path: &str, token: &str, json: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let (code, body) = http_call(api.port, method, path, Some(token), json.map(|j| j.to_string()).as_deref()).unwrap();
    (code, serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)))
}

/// Admins manage tokens and agents over the API: a tenant's admin only its tenant's (another
/// tenant's are not found), never a token for every tenant; viewers and ops not at all.
#[test]
fn admins_manage_tokens_and_agents_over_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serving.db");
    commit(&path, vec![sale_with("acme", "a", 0, "2026-11-27T10:00:00Z", "web", "5", OrderStatus::Placed)]);
    let api = start(&path);
    let now = chrono::Utc::now().timestamp();
    let (_, admin) = api.tokens.create(Some("acme"), Role::Admin, None, now).unwrap();
    let (_, ops) = api.tokens.create(Some("acme"), Role::Ops, None, now).unwrap();
    let (other_id, _) = api.tokens.create(Some("other"), Role::Viewer, None, now).unwrap();

    // Who am I.
    let (code, me) = call(&api, "GET", "/api/v1/me", &ops, None);
    assert_eq!((code, me["tenant"].as_str(), me["role"].as_str()), (200, Some("acme"), Some("ops")), "{me}");

    // Viewers and ops cannot touch tokens.
    assert_eq!(call(&api, "GET", "/api/v1/tokens", &ops, None).0, 403);
    assert_eq!(call(&api, "POST", "/api/v1/tokens", &ops, Some(serde_json::json!({}))).0, 403);

    // An admin of acme lists acme's tokens only.
    let (code, list) = call(&api, "GET", "/api/v1/tokens", &admin, None);
    assert_eq!(code, 200, "{list}");
    let tenants: Vec<&str> = list.as_array().unwrap().iter().map(|t| t["tenant"].as_str().unwrap_or("*")).collect();
    assert_eq!(tenants, ["acme", "acme"], "{list}");

    // It makes a viewer token of acme (its own tenant when none is named); the token works.
    let (code, made) = call(&api, "POST", "/api/v1/tokens", &admin, Some(serde_json::json!({ "expires": "1d" })));
    assert_eq!(code, 201, "{made}");
    assert_eq!(
        (made["tenant"].as_str(), made["role"].as_str(), made["state"].as_str()),
        (Some("acme"), Some("viewer"), Some("active"))
    );
    let new_token = made["token"].as_str().unwrap().to_owned();
    let new_id = made["id"].as_str().unwrap().to_owned();
    assert_eq!(status(api.port, "/api/v1/sales/totals", Some(&new_token)), 200);
    let listed = call(&api, "GET", "/api/v1/tokens", &admin, None).1;
    assert!(!listed.to_string().contains(&new_token), "a token is shown only when made");

    // Refusals, each naming what is wrong.
    for (body, want, says) in [
        (serde_json::json!({ "tenant": "other" }), 403, "tenant=\"other\""),
        (serde_json::json!({ "all_tenants": true }), 403, "all_tenants"),
        (serde_json::json!({ "role": "root" }), 400, "role=\"root\""),
        (serde_json::json!({ "expires": "soon" }), 400, "expires"),
        (serde_json::json!({ "tenant": "acme", "colour": "red" }), 400, "colour"),
    ] {
        let (code, answer) = call(&api, "POST", "/api/v1/tokens", &admin, Some(body.clone()));
        assert_eq!(code, want, "{body}: {answer}");
        assert!(answer["error"].as_str().unwrap_or("").contains(says), "{body}: {answer}");
    }
    let (code, answer) = http_call(api.port, "POST", "/api/v1/tokens", Some(&admin), Some("{not json")).unwrap();
    assert_eq!(code, 400, "{answer}");

    // Revoking: another tenant's token is not found; its own is revoked and refused at once.
    assert_eq!(call(&api, "DELETE", &format!("/api/v1/tokens/{other_id}"), &admin, None).0, 404);
    assert!(api.tokens.list().unwrap().iter().any(|t| t.id == other_id && t.revoked_at.is_none()), "still active");
    let never_used = call(&api, "POST", "/api/v1/tokens", &admin, Some(serde_json::json!({ "role": "ops" }))).1;
    let (code, revoked) =
        call(&api, "DELETE", &format!("/api/v1/tokens/{}", never_used["id"].as_str().unwrap()), &admin, None);
    assert_eq!((code, revoked["state"].as_str()), (200, Some("revoked")), "{revoked}");
    assert_eq!(status(api.port, "/api/v1/sales/totals", Some(never_used["token"].as_str().unwrap())), 401);
    let (code, _) = call(&api, "DELETE", &format!("/api/v1/tokens/{new_id}"), &admin, None);
    assert_eq!(code, 200);
    assert_eq!(call(&api, "DELETE", "/api/v1/tokens/nope", &admin, None).0, 404);

    // The admin for every tenant sees and may make every kind.
    let all = call(&api, "GET", "/api/v1/tokens", &api.token, None).1;
    assert!(all.as_array().unwrap().iter().any(|t| t["tenant"] == "other"), "{all}");
    let (code, made) = call(
        &api,
        "POST",
        "/api/v1/tokens",
        &api.token,
        Some(serde_json::json!({ "all_tenants": true, "role": "ops", "expires": "never" })),
    );
    assert_eq!((code, made["tenant"].is_null(), made["expires_at"].is_null()), (201, true, true), "{made}");

    // Agents: an admin revokes its tenant's agents, not another's.
    let enroll = |tenant: &str, id: &str| {
        let token = api.fleet.create_token(tenant, Duration::from_secs(60), now).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
        api.fleet.enroll(&token, id, &csr, now).unwrap();
    };
    enroll("acme", "till-1");
    enroll("other", "till-9");
    assert_eq!(call(&api, "POST", "/api/v1/agents/till-1/revoke", &ops, None).0, 403);
    assert_eq!(call(&api, "POST", "/api/v1/agents/till-9/revoke", &admin, None).0, 404);
    let (code, agent) = call(&api, "POST", "/api/v1/agents/till-1/revoke", &admin, None);
    assert_eq!((code, agent["tenant"].as_str()), (200, Some("acme")), "{agent}");
    assert!(agent["revoked_at"].is_string());
    let revoked = api.fleet.revoked().unwrap();
    assert!(revoked.contains("till-1") && !revoked.contains("till-9"), "{revoked:?}");
    api.shutdown.cancel();
}

/// Alerts: low stock for every role; agents that went silent, stopped on an error or have a
/// full spool for ops; a revoked agent raises none.
#[test]
fn alerts_report_low_stock_and_agents_that_need_attention() {
    use actidash_shared::kafka::FleetRecord;
    use actidash_shared::wire::{Heartbeat, SourceStatus};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serving.db");
    commit(
        &path,
        vec![
            event(
                0,
                "2026-11-27T09:00:00Z",
                Payload::Inventory(InventoryLevel { sku: "mug".into(), warehouse: "W".into(), on_hand: 3 }),
            ),
            event(
                1,
                "2026-11-27T09:00:00Z",
                Payload::Inventory(InventoryLevel { sku: "cap".into(), warehouse: "W".into(), on_hand: 500 }),
            ),
        ],
    );
    let now = chrono::Utc::now();
    let heartbeat = |agent: &str, ago: i64, sources: Vec<SourceStatus>| FleetRecord {
        tenant: "acme".into(),
        agent_id: agent.into(),
        received_at: now - chrono::Duration::seconds(ago),
        transport: "quic".into(),
        remote_addr: "127.0.0.1:9".into(),
        heartbeat: Heartbeat { sources, ..Default::default() },
    };
    let source = |id: &str, state: &str, error: Option<&str>| SourceStatus {
        source_id: id.into(),
        state: state.into(),
        last_error: error.map(String::from),
        ..Default::default()
    };
    let mut store = Store::open(&path).unwrap();
    store
        .commit(CommitWork {
            fleet: vec![
                heartbeat("fine", 1, vec![source("orders", "running", None)]),
                heartbeat("silent", 600, vec![]),
                heartbeat("revoked", 600, vec![]),
                heartbeat(
                    "broken",
                    1,
                    vec![
                        source("orders", "error", Some("orders.csv: permission denied")),
                        source("web", "paused", None),
                    ],
                ),
            ],
            ..Default::default()
        })
        .unwrap();
    drop(store);
    let api = start(&path);
    let token = api.fleet.create_token("acme", Duration::from_secs(60), now.timestamp()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    api.fleet.enroll(&token, "revoked", &csr, now.timestamp()).unwrap();
    api.fleet.revoke("revoked", now.timestamp()).unwrap();
    let created = now.timestamp();
    let (_, viewer) = api.tokens.create(Some("acme"), Role::Viewer, None, created).unwrap();
    let (_, ops) = api.tokens.create(Some("acme"), Role::Ops, None, created).unwrap();

    let answer = |token: &str, query: &str| -> serde_json::Value {
        serde_json::from_str(&http_get_auth(api.port, &format!("/api/v1/alerts{query}"), Some(token)).unwrap()).unwrap()
    };
    let keys = |a: &serde_json::Value| -> Vec<String> {
        a["alerts"].as_array().unwrap().iter().map(|x| x["key"].as_str().unwrap().to_owned()).collect()
    };
    let seen = answer(&ops, "");
    assert_eq!(
        keys(&seen),
        [
            "agent_offline/acme/silent",
            "source_error/acme/broken/orders",
            "spool_full/acme/broken/web",
            "low_stock/acme/mug/W"
        ],
        "{seen}"
    );
    assert_eq!(seen["fleet"], true);
    let offline = &seen["alerts"][0];
    assert_eq!((offline["severity"].as_str(), offline["kind"].as_str()), (Some("critical"), Some("agent_offline")));
    assert!(offline["message"].as_str().unwrap().contains("10 min"), "{offline}");
    assert!(seen["alerts"][1]["message"].as_str().unwrap().ends_with("orders.csv: permission denied"));
    // A viewer: stock only. A higher threshold: more stock alerts.
    let viewed = answer(&viewer, "");
    assert_eq!((keys(&viewed), viewed["fleet"].as_bool()), (vec!["low_stock/acme/mug/W".to_owned()], Some(false)));
    assert_eq!(
        keys(&answer(&viewer, "?threshold=1000")),
        ["low_stock/acme/mug/W", "low_stock/acme/cap/W"],
        "lowest first"
    );
    assert_eq!(status(api.port, "/api/v1/alerts?threshold=many", Some(&viewer)), 400);
    assert_eq!(status(api.port, "/api/v1/alerts?tenant=other", Some(&viewer)), 403);
    api.shutdown.cancel();
}

/// Half-sent requests (headers never finished) are closed after `header_read_timeout` and do
/// not keep the API from answering meanwhile (issue 17, low 9: 140 of them were held 40 s).
#[test]
fn half_sent_requests_are_closed_and_do_not_hold_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("serving.db");
    commit(&store, vec![sale_with("acme", "a", 0, "2026-11-27T10:00:00Z", "web", "5", OrderStatus::Placed)]);
    let api = start(&store);
    let mut half: Vec<TcpStream> = (0..140)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", api.port)).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    let totals = api.json("/api/v1/sales/totals");
    assert_eq!(totals[0]["revenue"], "5", "answered while they hang: {totals}");
    for s in &mut half {
        // Our own bound is far above the API's 500 ms: a read that times out here is a failure.
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut answer = Vec::new();
        let read = std::io::Read::read_to_end(s, &mut answer);
        assert!(read.is_ok(), "the API closed the connection: {read:?}");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
}
