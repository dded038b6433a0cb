//! Database sources against real PostgreSQL and MariaDB servers (started by `scripts/db.sh`,
//! which `scripts/test.sh` runs): out-of-order commits, connection loss, read-only accounts,
//! logical replication. Each test works in a database of its own.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ::mysql::prelude::Queryable as _;
use actidash_shared::event::{Event, Payload};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::sources::file::tests::test_context;
use crate::spool::Spool;

/// The admin URL of a server the test script started; None (the test is skipped, saying so)
/// when there is none and the suite does not require services.
fn server(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("ACTIDASH_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "{test}: {var} is not set but ACTIDASH_REQUIRE_SERVICES=1; start the servers with scripts/db.sh"
            );
            eprintln!("{test}: skipped: {var} not set (run scripts/test.sh, which starts the servers)");
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

const MAPPING: &str = r#"
[mapping]
domain = "inventory"
event_time = { field = "at" }
fields = { sku = "sku", warehouse = "wh", on_hand = "qty" }
"#;

fn source_config(kind: &str, extra: &str) -> DbSourceConfig {
    let text = format!("id = \"db\"\n{extra}\n{MAPPING}");
    toml::from_str(&text).unwrap_or_else(|e| panic!("{kind} config: {e}"))
}

/// A source running on its thread; stopped on drop.
struct Running {
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    status: crate::sources::SharedStatus,
}

impl Running {
    fn start(config: DbSourceConfig, dialect: Dialect, spool: &Path) -> Running {
        let shutdown = CancellationToken::new();
        let ctx = test_context(spool, &spool.with_extension("dead.jsonl"), &shutdown);
        let status = ctx.status.clone();
        let source = DbSource { config, dialect, ctx };
        Running { shutdown, thread: Some(std::thread::spawn(move || source.run())), status }
    }

    fn status(&self) -> actidash_shared::wire::SourceStatus {
        self.status.lock().unwrap().clone()
    }

    fn stop(mut self) {
        self.shutdown.cancel();
        self.thread.take().unwrap().join().unwrap().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn skus(spool: &Path) -> Vec<String> {
    let mut s = Spool::open(spool).unwrap();
    s.read("db", 0, 10_000, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| match Event::from_json(&r.body).unwrap().payload {
            Payload::Inventory(i) => format!("{}={}", i.sku, i.on_hand),
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Waits until the spool holds `n` events of the source (or 30 s); returns them.
fn wait_for(spool: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = skus(spool);
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- PostgreSQL ----

/// A database of its own with an `orders` table and a read-only role; (admin url, db url
/// without password, password file, db name).
struct PgDb {
    admin: String,
    url: String,
    password_file: tempfile::NamedTempFile,
    name: String,
}

impl PgDb {
    fn new(admin: &str, role_attrs: &str) -> PgDb {
        let name = unique("actidash_t");
        let mut c = ::postgres::Client::connect(admin, ::postgres::NoTls).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        c.batch_execute(&format!("CREATE ROLE {name} LOGIN PASSWORD 'pw-{name}' {role_attrs}")).unwrap();
        let db_admin = with_db(admin, &name);
        let mut c = ::postgres::Client::connect(&db_admin, ::postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, sku text NOT NULL, wh text NOT NULL DEFAULT 'W', qty int NOT NULL, at timestamptz NOT NULL DEFAULT now());
             GRANT SELECT ON orders TO {name};"
        ))
        .unwrap();
        let password_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(password_file.path(), format!("pw-{name}\n")).unwrap();
        let url = with_db(admin, &name).replacen("postgres@", &format!("{name}@"), 1);
        PgDb { admin: db_admin, url, password_file, name }
    }

    fn client(&self) -> ::postgres::Client {
        ::postgres::Client::connect(&self.admin, ::postgres::NoTls).unwrap()
    }
}

fn with_db(url: &str, db: &str) -> String {
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    format!("{base}/{db}")
}

#[test]
fn postgres_rows_committed_out_of_order_are_read_once_with_a_read_only_account() {
    let Some(admin) = server("ACTIDASH_PG_URL", "postgres out of order") else { return };
    let db = PgDb::new(&admin, "");
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let cfg = source_config(
        "postgres",
        &format!(
            "url = \"{}\"\npassword_file = \"{}\"\ntable = \"orders\"\nincremental_column = \"id\"\npoll_interval_ms = 50",
            db.url,
            db.password_file.path().display()
        ),
    );
    cfg.validate(Dialect::Postgres).unwrap();
    let cfg_again = cfg.clone();
    let mut early = db.client();
    early.batch_execute("INSERT INTO orders (sku, qty) VALUES ('first', 1)").unwrap();
    let running = Running::start(cfg, Dialect::Postgres, &spool);
    assert_eq!(wait_for(&spool, 1), ["first=1"]);

    // A takes id 2 and stays open; B takes id 3 and commits first.
    let mut a = db.client();
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("INSERT INTO orders (sku, qty) VALUES ('slow', 2)").unwrap();
    db.client().batch_execute("INSERT INTO orders (sku, qty) VALUES ('fast', 3)").unwrap();
    std::thread::sleep(Duration::from_millis(600)); // a dozen polls
    assert_eq!(skus(&spool), ["first=1"], "nothing past the oldest running transaction");
    assert!(running.status().position.contains("wait for transactions"), "{:?}", running.status().position);
    tx.commit().unwrap();
    assert_eq!(wait_for(&spool, 3), ["first=1", "slow=2", "fast=3"]);

    // The connection is lost (the server ends it): the source reconnects and reads on.
    let mut admin_client = db.client();
    admin_client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND usename = $1",
            &[&db.name],
        )
        .unwrap();
    admin_client.batch_execute("INSERT INTO orders (sku, qty) VALUES ('after', 4)").unwrap();
    assert_eq!(wait_for(&spool, 4)[3..], ["after=4"]);
    running.stop();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(skus(&spool).len(), 4, "nothing twice");

    // How far behind the table a position is.
    let mut reader = postgres::PgReader::new(&cfg_again, cfg_again.password_source().load().unwrap()).unwrap();
    reader.connect().unwrap();
    assert_eq!(reader.rows_behind(&KeyPosition::default()).unwrap(), Some(4));
    assert_eq!(reader.rows_behind(&KeyPosition { key: vec![serde_json::json!(1)] }).unwrap(), Some(3));
    assert_eq!(reader.rows_behind(&KeyPosition { key: vec![serde_json::json!(4)] }).unwrap(), Some(0));
}

#[test]
fn postgres_timestamp_and_tie_breaker_resume_after_a_restart_and_a_missing_table_is_retried() {
    let Some(admin) = server("ACTIDASH_PG_URL", "postgres timestamp") else { return };
    let db = PgDb::new(&admin, "");
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let cfg = source_config(
        "postgres",
        &format!(
            "url = \"{}\"\npassword_file = \"{}\"\nquery = \"SELECT * FROM late\"\ntimestamp_column = \"at\"\ntie_breaker = \"id\"\npoll_interval_ms = 50\nmax_backoff_ms = 200",
            db.url,
            db.password_file.path().display()
        ),
    );
    let running = Running::start(cfg.clone(), Dialect::Postgres, &spool);
    wait_until("the error about the missing table", || {
        running.status().last_error.is_some_and(|e| e.contains("late") && e.contains("does not exist"))
    });
    let mut c = db.client();
    c.batch_execute(&format!(
        "CREATE TABLE late (id int PRIMARY KEY, sku text, wh text, qty int, at timestamptz);
         GRANT SELECT ON late TO {0};
         INSERT INTO late VALUES (2, 'b', 'W', 2, '2026-11-27T10:00:00Z'), (1, 'a', 'W', 1, '2026-11-27T10:00:00Z'),
                                 (3, 'c', 'W', 3, '2026-11-27T09:00:00Z'), (9, 'bad', 'W', NULL, '2026-11-27T09:30:00Z');",
        db.name
    ))
    .unwrap();
    assert_eq!(wait_for(&spool, 3), ["c=3", "a=1", "b=2"], "timestamp order, then the tie-breaker");
    running.stop();
    // The row that fails the mapping is a dead letter naming the database and its position.
    let dead = std::fs::read_to_string(spool.with_extension("dead.jsonl")).unwrap();
    let entry: serde_json::Value = serde_json::from_str(dead.lines().next().unwrap()).unwrap();
    assert!(entry["reason"].as_str().unwrap().contains("on_hand"), "{entry}");
    assert!(entry["database"].as_str().unwrap().contains(&db.name), "{entry}");
    assert_eq!(entry["position"][1], "9", "{entry}");
    assert!(!dead.contains(&format!("pw-{}", db.name)), "no password in dead letters");
    c.batch_execute("INSERT INTO late VALUES (4, 'd', 'W', 4, '2026-11-27T10:00:00Z')").unwrap();
    let running = Running::start(cfg, Dialect::Postgres, &spool);
    assert_eq!(wait_for(&spool, 4), ["c=3", "a=1", "b=2", "d=4"]);
    running.stop();
}

#[test]
fn postgres_logical_replication_captures_inserts_and_updates_once_and_moves_an_idle_slot_on() {
    let Some(admin) = server("ACTIDASH_PG_URL", "postgres logical") else { return };
    let db = PgDb::new(&admin, "REPLICATION");
    let mut c = db.client();
    // Creating a publication needs CREATE on the database and ownership of the table.
    c.batch_execute(&format!(
        "ALTER TABLE orders OWNER TO {0}; GRANT CREATE ON DATABASE {0} TO {0}; CREATE TABLE other (x int);",
        db.name
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let base = format!(
        "url = \"{}\"\npassword_file = \"{}\"\ntable = \"public.orders\"\npoll_interval_ms = 50\nmax_backoff_ms = 200",
        db.url,
        db.password_file.path().display()
    );

    // Without create = true, nothing is created: a clear error, retried.
    let no_create = source_config("postgres", &format!("{base}\nlogical = {{ slot = \"s_{0}\" }}", db.name));
    let running = Running::start(no_create, Dialect::Postgres, &spool);
    wait_until("the missing publication error", || {
        running.status().last_error.is_some_and(|e| e.contains("does not exist") && e.contains("logical.create"))
    });
    running.stop();

    let cfg = source_config("postgres", &format!("{base}\nlogical = {{ slot = \"s_{0}\", create = true }}", db.name));
    let running = Running::start(cfg.clone(), Dialect::Postgres, &spool);
    wait_until("the slot", || {
        c.query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&format!("s_{}", db.name)])
            .unwrap()
            .is_some()
    });
    c.batch_execute(
        "INSERT INTO orders (sku, qty) VALUES ('a', 1), ('b', 2);
         UPDATE orders SET qty = 5 WHERE sku = 'a';
         DELETE FROM orders WHERE sku = 'b';",
    )
    .unwrap();
    assert_eq!(wait_for(&spool, 3), ["a=1", "b=2", "a=5"]);
    wait_until("the delete to be reported", || running.status().position.contains("deletes seen: 1"));
    assert_eq!(running.status().n_errors, 0);
    running.stop();

    // Restarted: nothing again; new changes only.
    c.batch_execute("INSERT INTO orders (sku, qty) VALUES ('c', 3)").unwrap();
    let running = Running::start(cfg, Dialect::Postgres, &spool);
    assert_eq!(wait_for(&spool, 4), ["a=1", "b=2", "a=5", "c=3"]);

    // Writes to a table outside the publication: the idle slot is moved on past them.
    c.batch_execute("INSERT INTO other SELECT generate_series(1, 20000)").unwrap();
    let after: String = c.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    let after = pgoutput::parse_lsn(&after).unwrap();
    wait_until("the idle slot to move on", || {
        let confirmed: Option<String> = c
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&format!("s_{}", db.name)],
            )
            .unwrap()
            .get(0);
        confirmed.and_then(|t| pgoutput::parse_lsn(&t)).is_some_and(|l| l >= after)
    });
    assert!(running.status().position.contains("retains"), "{}", running.status().position);
    running.stop();
    assert_eq!(skus(&spool).len(), 4, "nothing twice");
    c.execute("SELECT pg_drop_replication_slot($1)", &[&format!("s_{}", db.name)]).unwrap();
}

// ---- MySQL / MariaDB ----

/// A database of its own with an `orders` table and a user with `grants`.
struct MyDb {
    admin: ::mysql::Pool,
    url: String,
    name: String,
}

impl MyDb {
    fn new(admin_url: &str, grants: &str) -> MyDb {
        let name = unique("actidash_t");
        let pool = ::mysql::Pool::new(admin_url).unwrap();
        let mut c = pool.get_conn().unwrap();
        c.query_drop(format!("CREATE DATABASE {name}")).unwrap();
        c.query_drop(format!(
            "CREATE TABLE {name}.orders (id BIGINT AUTO_INCREMENT PRIMARY KEY, sku VARCHAR(40) NOT NULL, wh VARCHAR(10) NOT NULL DEFAULT 'W', qty INT NOT NULL, at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB"
        ))
        .unwrap();
        c.query_drop(format!("CREATE USER '{name}'@'127.0.0.1' IDENTIFIED BY 'pw-{name}'")).unwrap();
        c.query_drop(format!("GRANT SELECT ON {name}.* TO '{name}'@'127.0.0.1'")).unwrap();
        if !grants.is_empty() {
            c.query_drop(format!("GRANT {grants} ON *.* TO '{name}'@'127.0.0.1'")).unwrap();
        }
        let host = admin_url.split_once('@').map_or("", |(_, h)| h);
        let host = host.rsplit_once('/').map_or(host, |(h, _)| h);
        MyDb { admin: pool, url: format!("mysql://{name}@{host}/{name}"), name }
    }

    fn conn(&self) -> ::mysql::PooledConn {
        let mut c = self.admin.get_conn().unwrap();
        c.query_drop(format!("USE {}", self.name)).unwrap();
        c
    }
}

fn mysql_out_of_order(grants: &str, settle_ms: u64, hold: Duration) {
    let Some(admin) = server("ACTIDASH_MYSQL_URL", "mysql out of order") else { return };
    let db = MyDb::new(&admin, grants);
    let password_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(password_file.path(), format!("pw-{}", db.name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let cfg = source_config(
        "mysql",
        &format!(
            "url = \"{}\"\npassword_file = \"{}\"\ntable = \"orders\"\nincremental_column = \"id\"\npoll_interval_ms = 50\nsettle_ms = {settle_ms}",
            db.url,
            password_file.path().display()
        ),
    );
    cfg.validate(Dialect::Mysql).unwrap();
    let cfg_again = cfg.clone();
    db.conn().query_drop("INSERT INTO orders (sku, qty) VALUES ('first', 1)").unwrap();
    let running = Running::start(cfg, Dialect::Mysql, &spool);
    assert_eq!(wait_for(&spool, 1), ["first=1"]);

    let mut a = db.conn();
    a.query_drop("START TRANSACTION").unwrap();
    a.query_drop("INSERT INTO orders (sku, qty) VALUES ('slow', 2)").unwrap();
    db.conn().query_drop("INSERT INTO orders (sku, qty) VALUES ('fast', 3)").unwrap();
    std::thread::sleep(hold);
    a.query_drop("COMMIT").unwrap();
    assert_eq!(wait_for(&spool, 3), ["first=1", "slow=2", "fast=3"]);

    // The server ends the source's connection: it reconnects and reads on.
    let mut c = db.conn();
    let ids: Vec<u64> =
        c.exec("SELECT id FROM information_schema.PROCESSLIST WHERE USER = ?", (db.name.clone(),)).unwrap();
    for id in ids {
        let _ = c.query_drop(format!("KILL {id}"));
    }
    c.query_drop("INSERT INTO orders (sku, qty) VALUES ('after', 4)").unwrap();
    assert_eq!(wait_for(&spool, 4)[3..], ["after=4"]);
    running.stop();
    assert_eq!(skus(&spool).len(), 4, "nothing twice");

    // How far behind the table a position is.
    let mut reader = mysql::MysqlReader::new(&cfg_again, cfg_again.password_source().load().unwrap()).unwrap();
    reader.connect().unwrap();
    assert_eq!(reader.rows_behind(&KeyPosition::default()).unwrap(), Some(4));
    assert_eq!(reader.rows_behind(&KeyPosition { key: vec![serde_json::json!(1)] }).unwrap(), Some(3));
}

#[test]
fn mysql_rows_committed_out_of_order_within_the_settle_delay_are_read_once() {
    // A SELECT-only account cannot see running transactions: the settle delay guards.
    mysql_out_of_order("", 1_500, Duration::from_millis(300));
}

#[test]
fn mysql_a_transaction_longer_than_the_settle_delay_is_waited_for_when_visible() {
    // With PROCESS, the running writer is seen and waited for, however long it takes.
    mysql_out_of_order("PROCESS", 200, Duration::from_millis(1_500));
}

// ---- TLS ----

/// A CA file that signed nothing the servers present.
fn stranger_ca(dir: &Path) -> std::path::PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let path = dir.join("stranger-ca.pem");
    std::fs::write(&path, params.self_signed(&key).unwrap().pem()).unwrap();
    path
}

#[test]
fn database_sources_over_tls_verify_the_server_and_refuse_an_unknown_ca() {
    let Some(pg_admin) = server("ACTIDASH_PG_URL", "tls") else { return };
    let Some(my_admin) = server("ACTIDASH_MYSQL_URL", "tls") else { return };
    let ca = std::env::var("ACTIDASH_DB_CA").expect("scripts/db.sh exports ACTIDASH_DB_CA with the servers");
    let dir = tempfile::tempdir().unwrap();
    let stranger = stranger_ca(dir.path());

    // PostgreSQL: the certificate names localhost.
    let db = PgDb::new(&pg_admin, "");
    db.client().batch_execute("INSERT INTO orders (sku, qty) VALUES ('tls', 1)").unwrap();
    let url = db.url.replace("127.0.0.1", "localhost");
    let pg = |ca: &Path| {
        source_config(
            "postgres",
            &format!(
                "url = \"{url}\"\npassword_file = \"{}\"\ntable = \"orders\"\nincremental_column = \"id\"\npoll_interval_ms = 50\nmax_backoff_ms = 200\ntls = {{ ca_file = \"{}\" }}",
                db.password_file.path().display(),
                ca.display()
            ),
        )
    };
    let spool = dir.path().join("pg.db");
    let refused = Running::start(pg(&stranger), Dialect::Postgres, &spool);
    wait_until("the unknown CA to be refused", || {
        refused.status().last_error.is_some_and(|e| e.to_lowercase().contains("certificate"))
    });
    refused.stop();
    assert!(skus(&spool).is_empty());
    let running = Running::start(pg(Path::new(&ca)), Dialect::Postgres, &spool);
    assert_eq!(wait_for(&spool, 1), ["tls=1"]);
    let encrypted: Option<bool> = db
        .client()
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1 AND a.usename = $1",
            &[&db.name],
        )
        .unwrap()
        .get(0);
    assert_eq!(encrypted, Some(true), "the source's connection is encrypted");
    assert!(running.status().position.contains("(TLS)"));
    running.stop();

    // MariaDB: the account requires TLS, so only an encrypted connection reads anything.
    let my = MyDb::new(&my_admin, "");
    my.conn().query_drop(format!("ALTER USER '{}'@'127.0.0.1' REQUIRE SSL", my.name)).unwrap();
    my.conn().query_drop("INSERT INTO orders (sku, qty) VALUES ('tls', 2)").unwrap();
    let password_file = dir.path().join("my.pw");
    std::fs::write(&password_file, format!("pw-{}", my.name)).unwrap();
    let mysql = |tls: &str| {
        source_config(
            "mysql",
            &format!(
                "url = \"{}\"\npassword_file = \"{}\"\ntable = \"orders\"\nincremental_column = \"id\"\npoll_interval_ms = 50\nsettle_ms = 100\nmax_backoff_ms = 200\n{tls}",
                my.url,
                password_file.display()
            ),
        )
    };
    let spool = dir.path().join("my.db");
    let plain = Running::start(mysql(""), Dialect::Mysql, &spool);
    wait_until("the server to refuse a connection without TLS", || plain.status().last_error.is_some());
    plain.stop();
    let running = Running::start(mysql(&format!("tls = {{ ca_file = \"{ca}\" }}")), Dialect::Mysql, &spool);
    assert_eq!(wait_for(&spool, 1), ["tls=2"]);
    running.stop();
}
