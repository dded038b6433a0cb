//! The desktop app (Tauri 2 on WebKitGTK) in a real window under Xvfb, against a running
//! deployment fed by an agent: it connects with an API token (from the environment, as a
//! scripted install would), shows the Overview, and what the Overview shows equals the API's
//! figures (the app writes its Overview's numbers to a probe file). A screenshot of the screen
//! goes to `docs/screenshots/desktop-overview.png`. The window runs in a D-Bus session with a
//! real notification service (Debian's dunst), and the test reads the notifications the app
//! sent off the bus (dbus-monitor): new alerts are notified, and not when muted.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use actidash_tests::generator::Generator;
use actidash_tests::harness::{Deployment, Process, bin};
use common::{deployment, feed_acme};

/// A deployment fed with `n` records of tenant `acme` whose API lets the app's origin call it,
/// and a home of private configuration, data and cache folders for the app.
struct Setup {
    root: PathBuf,
    d: Deployment,
    cloud: Process,
    _agent: Process,
    home: PathBuf,
}

fn setup(name: &str, seed: u64, n: usize) -> Setup {
    let (root, data, mut d) = deployment(name, None);
    // The app's pages come from its own origin: the API lets that origin call it.
    d.serve_extra = "cors_origins = [\"tauri://localhost\", \"http://tauri.localhost\"]\n".into();
    d.write_cloud_config().unwrap();
    let cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(Duration::from_secs(30)).unwrap();
    let mut g = Generator::new(seed, 0);
    let lines: Vec<_> = (0..n).map(|_| g.next_line(chrono::Utc::now())).collect();
    let agent = feed_acme(&d, &data, &format!("agent-{name}"), &lines);
    let home = root.join("home");
    for sub in ["config", "data", "cache"] {
        std::fs::create_dir_all(home.join(sub)).unwrap();
    }
    Setup { root, d, cloud, _agent: agent, home }
}

/// `xvfb-run` of `script` in a D-Bus session of its own, with the app's folders under `home`
/// and WebKit set for a virtual display.
fn xvfb(script: &str, home: &Path) -> Command {
    // A display number of this test's own. `xvfb-run -a` is not safe to run twice at once: both
    // pick the first number without a lock file, one Xvfb fails, and that run's app talks to
    // the other's X server until that one stops under it ("X connection to :99 broken").
    // Numbers are distinct per process and per call; one held by a server left over elsewhere
    // is stepped over by a multiple of the stride, keeping them distinct.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 8;
    let mut display = 100 + (std::process::id() % 200) * 8 + call;
    while Path::new(&format!("/tmp/.X{display}-lock")).exists() {
        display += 1600;
    }
    let mut cmd = Command::new("xvfb-run");
    cmd.args([
        "-n",
        &display.to_string(),
        "-s",
        "-screen 0 1440x1000x24",
        "dbus-run-session",
        "--",
        "sh",
        "-c",
        script,
    ])
    .env("XDG_CONFIG_HOME", home.join("config"))
    .env("XDG_DATA_HOME", home.join("data"))
    .env("XDG_CACHE_HOME", home.join("cache"))
    .env("WEBKIT_DISABLE_COMPOSITING_MODE", "1")
    .env("WEBKIT_DISABLE_DMABUF_RENDERER", "1");
    cmd
}

/// Today's orders of tenant `acme`, as the API counts them.
fn orders_today(d: &Deployment) -> i64 {
    let start = chrono::Utc::now().timestamp() / 86_400 * 86_400;
    let today = d.get(&format!("/api/v1/sales?tenant=acme&from={start}&to={}", start + 86_400)).unwrap();
    today["rows"].as_array().unwrap().iter().map(|r| r["orders"].as_i64().unwrap()).sum()
}

/// The digits of a figure as shown.
fn shown_number(v: &serde_json::Value) -> Option<i64> {
    v.as_str().unwrap_or("").chars().filter(char::is_ascii_digit).collect::<String>().parse().ok()
}

#[test]
fn the_desktop_app_shows_the_overview_with_the_apis_numbers() {
    if actidash_tests::desktop("the_desktop_app_shows_the_overview_with_the_apis_numbers").is_none() {
        return;
    }
    let app = bin("actidash-desktop").expect("the desktop app is built (cargo build --workspace)");
    let Setup { root, d, mut cloud, _agent, home } = setup("desktop", 11, 1_000);
    let token = d.make_api_token(&["--tenant", "acme", "--role", "ops"]).unwrap();
    let probe = root.join("probe.json");
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots/desktop-overview.png");
    // The app runs, beside a notification service and a monitor of the notifications sent,
    // until its Overview shows figures and `$WAIT_FOR` (the alerts checked, or the stale
    // state); then the screen is captured and the app stopped.
    let script = r#"
        dunst > "$NOTES.dunst.log" 2>&1 & dunst=$!
        dbus-monitor --session "type='method_call',interface='org.freedesktop.Notifications',member='Notify'" > "$NOTES" 2>&1 & monitor=$!
        sleep 0.5
        "$APP" & pid=$!
        ready() { grep -q '"orders"' "$ACTIDASH_DESKTOP_PROBE" 2>/dev/null && grep -q "$WAIT_FOR" "$ACTIDASH_DESKTOP_PROBE"; }
        for i in $(seq 1 300); do ready && break; kill -0 $pid 2>/dev/null || exit 3; sleep 0.2; done
        ready || { kill $pid; cat "$ACTIDASH_DESKTOP_PROBE"; exit 4; }
        if grep -q '"__notified":"[1-9]' "$ACTIDASH_DESKTOP_PROBE"; then
            for i in $(seq 1 50); do grep -q 'ActiDash' "$NOTES" && break; sleep 0.2; done
        fi
        sleep 1
        import -window root "$SHOT"
        kill $pid; wait $pid 2>/dev/null; kill $monitor $dunst; exit 0
    "#;
    // One run of the app in `home`, until its Overview is shown: what it showed, and the
    // notifications sent meanwhile.
    let run = |home: &Path, shot: &Path, wait_for: &str| -> (serde_json::Value, String) {
        let notes = home.join("notifications.txt");
        let _ = std::fs::remove_file(&probe);
        let out = xvfb(script, home)
            .env("APP", &app)
            .env("SHOT", shot)
            .env("NOTES", &notes)
            .env("WAIT_FOR", wait_for)
            .env("ACTIDASH_URL", format!("http://127.0.0.1:{}", d.api_port))
            .env("ACTIDASH_TOKEN", &token)
            .env("ACTIDASH_DESKTOP_PROBE", &probe)
            .output()
            .expect("running xvfb-run");
        assert!(
            out.status.success(),
            "the desktop app did not show its Overview with {wait_for} ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let shown = serde_json::from_str(&std::fs::read_to_string(&probe).unwrap()).unwrap();
        (shown, std::fs::read_to_string(&notes).unwrap_or_default())
    };
    let checked = r#""__alerts_checked":"true""#;
    let (shown, notes) = run(&home, &shot, checked);
    let orders = orders_today(&d);
    assert!(orders > 0);
    assert_eq!(shown_number(&shown["orders"]), Some(orders), "the window shows {shown}");
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "the screenshot is empty");
    assert_eq!(shown["__stale"], "false");

    // The alerts it saw are the API's, each new one a notification delivered over D-Bus to the
    // notification service (more than three at once are one summary).
    let alerts = d.get_as(&token, "/api/v1/alerts").unwrap();
    let alerts = alerts["alerts"].as_array().unwrap().clone();
    let n_alerts = alerts.len();
    assert!(n_alerts > 0, "the data set has low stock");
    assert_eq!(shown["__alerts"], n_alerts.to_string(), "{shown}");
    assert_eq!(shown["__muted"], "false");
    if n_alerts <= 3 {
        assert_eq!(shown["__notified"], n_alerts.to_string(), "{shown}");
        for a in &alerts {
            let message = a["message"].as_str().unwrap();
            assert!(notes.contains(&format!("string \"{message}\"")), "{message} not notified: {notes}");
        }
    } else {
        assert_eq!(shown["__notified"], "1", "{shown}");
        assert!(notes.contains(&format!("string \"ActiDash: {n_alerts} new alerts\"")), "notifications sent: {notes}");
    }
    let sent = notes.matches("member=Notify").count();
    assert_eq!(sent.to_string(), shown["__notified"].as_str().unwrap(), "{notes}");

    // Muted (the setting the alert list writes), in a fresh home: the same alerts, no notification.
    let muted_home = root.join("home-muted");
    let settings = muted_home.join("config/dev.actidash.desktop/settings.json");
    std::fs::create_dir_all(settings.parent().unwrap()).unwrap();
    std::fs::write(&settings, r#"{"notifications":false}"#).unwrap();
    let (quiet, notes) = run(&muted_home, &root.join("muted.png"), checked);
    assert_eq!(quiet["__alerts"], n_alerts.to_string(), "{quiet}");
    assert_eq!((quiet["__notified"].as_str(), quiet["__muted"].as_str()), (Some("0"), Some("true")), "{quiet}");
    assert!(!notes.contains("ActiDash"), "muted, yet notified: {notes}");

    // Started again with the cloud gone: the last figures, marked stale.
    assert!(cloud.terminate(Duration::from_secs(10)));
    let (offline, _) = run(&home, &shot.with_file_name("desktop-offline.png"), r#""__stale":"true""#);
    assert_eq!(offline["orders"], shown["orders"], "the last figures seen");
}

/// The connection dialog, clicked through over WebDriver (tauri-driver and Debian's
/// WebKitWebDriver, under Xvfb): a wrong token is refused with the API's reason, the right one
/// connects and the Overview shows the API's orders.
#[test]
fn the_connection_dialog_is_clicked_through_over_webdriver() {
    let Some(tauri_driver) = actidash_tests::tauri_driver("the_connection_dialog_is_clicked_through_over_webdriver")
    else {
        return;
    };
    let app = bin("actidash-desktop").expect("the desktop app is built (cargo build --workspace)");
    let Setup { root, d, cloud: _cloud, _agent, home } = setup("desktop-webdriver", 12, 500);
    let token = d.make_api_token(&["--tenant", "acme", "--role", "viewer"]).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let script = r#"
        "$TAURI_DRIVER" --port "$PORT" > "$LOG" 2>&1 & driver=$!
        for i in $(seq 1 50); do curl -sf "http://127.0.0.1:$PORT/status" >/dev/null && break; sleep 0.2; done
        node "$SCRIPT"; status=$?
        kill $driver; wait $driver 2>/dev/null; exit $status
    "#;
    let out = xvfb(script, &home)
        .env("TAURI_DRIVER", &tauri_driver)
        .env("PORT", port.to_string())
        .env("LOG", root.join("tauri-driver.log"))
        .env("SCRIPT", Path::new(env!("CARGO_MANIFEST_DIR")).join("../desktop/ui/tests/webdriver.mjs"))
        .env("ACTIDASH_DRIVER", format!("http://127.0.0.1:{port}"))
        .env("ACTIDASH_APP", &app)
        .env("ACTIDASH_CONNECT_URL", format!("http://127.0.0.1:{}", d.api_port))
        .env("ACTIDASH_CONNECT_TOKEN", &token)
        .output()
        .expect("running xvfb-run");
    assert!(
        out.status.success(),
        "the WebDriver test failed ({}): {}{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(root.join("tauri-driver.log")).unwrap_or_default()
    );
    let result: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("")).unwrap();
    assert_eq!(result["wrong"], "no such API token", "{result}");
    assert_eq!(shown_number(&result["orders"]), Some(orders_today(&d)), "{result}");
    // The connection was saved in the OS's configuration folder.
    let saved = std::fs::read_to_string(home.join("config/dev.actidash.desktop/connections.json")).unwrap();
    assert!(saved.contains(&format!("127.0.0.1:{}", d.api_port)), "{saved}");
    // The alerts button counts the API's alerts (a viewer's: low stock), the list shows each,
    // and turning notifications off there is saved as the setting the app obeys.
    let n_alerts = d.get_as(&token, "/api/v1/alerts").unwrap()["alerts"].as_array().unwrap().len();
    assert_eq!(result["alerts"], n_alerts.to_string(), "{result}");
    assert_eq!(result["listed"], n_alerts, "{result}");
    assert_eq!(result["muted"], true, "{result}");
    let settings = std::fs::read_to_string(home.join("config/dev.actidash.desktop/settings.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&settings).unwrap(),
        serde_json::json!({ "notifications": false })
    );
}
