//! The HTTP API over a real store and a real socket: the reports' shapes (money as decimal
//! text), parameters checked with a 400 that names the parameter, and the live push carrying
//! the dashboards that changed.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use actidash_shared::event::{Event, InventoryLevel, MarketingTouch, OrderStatus, Payload};
use actidash_shared::testing::sale_with;
use actidash_tests::harness::{http_get, http_get_auth};
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
    let tokens = ApiTokens::open(data_dir).unwrap();
    let (_, token) = tokens.create(None, Role::Admin, None, chrono::Utc::now().timestamp()).unwrap();
    let options = ServeOptions {
        tokens: tokens.clone(),
        ui_dir: None,
        cors_origins: vec![],
        rate_per_token: cloud_aggregator::serve::DEFAULT_RATE_PER_TOKEN,
    };
    rt.spawn(cloud_aggregator::serve::run_on(listener, location, Default::default(), options, shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(port, "/readyz").is_err() {
        assert!(Instant::now() < deadline, "the API did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Api { port, shutdown, tokens, token, _rt: rt }
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
    drop(tx);
    thread.join().unwrap();
    // The API reads it.
    let dir = tempfile::tempdir().unwrap();
    let api = start_on(location, dir.path());
    let totals = api.json("/api/v1/sales/totals");
    assert_eq!(totals[0]["revenue"], "12.5", "{totals}");
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
        "/api/v1/stats",
        "/api/v1/live",
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
        "/api/v1/behavior",
        "/api/v1/behavior/funnel",
        "/api/v1/events",
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
    for p in &paths {
        let op = &doc["paths"][p]["get"];
        assert!(op["responses"]["200"].is_object() && op["responses"]["401"].is_object(), "{p}: {op}");
        if p == "/api/v1/live" {
            continue; // a stream: its answer is checked in the live push's test
        }
        http_get_auth(api.port, p, Some(&api.token)).unwrap_or_else(|e| panic!("{p} is documented but: {e}"));
        assert_eq!(status(api.port, p, None), 401, "{p} is documented as needing a token");
    }
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
