//! The desktop app (Tauri 2 on WebKitGTK) in a real window under Xvfb, against a running
//! deployment fed by an agent: it connects with an API token (from the environment, as a
//! scripted install would), shows the Overview, and what the Overview shows equals the API's
//! figures (the app writes its Overview's numbers to a probe file). A screenshot of the screen
//! goes to `docs/screenshots/desktop-overview.png`.

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

/// `xvfb-run` of `script`, with the app's folders under `home` and WebKit set for a virtual
/// display.
fn xvfb(script: &str, home: &Path) -> Command {
    let mut cmd = Command::new("xvfb-run");
    cmd.args(["-a", "-s", "-screen 0 1440x1000x24", "sh", "-c", script])
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
    // The app runs until its Overview has been shown (the probe file), then the screen is
    // captured and the app stopped.
    let script = r#"
        "$APP" & pid=$!
        for i in $(seq 1 300); do [ -s "$ACTIDASH_DESKTOP_PROBE" ] && break; kill -0 $pid 2>/dev/null || exit 3; sleep 0.2; done
        [ -s "$ACTIDASH_DESKTOP_PROBE" ] || { kill $pid; exit 4; }
        sleep 1
        import -window root "$SHOT"
        kill $pid; wait $pid 2>/dev/null; exit 0
    "#;
    // One run of the app until its Overview is shown.
    let run = |shot: &Path| {
        xvfb(script, &home)
            .env("APP", &app)
            .env("SHOT", shot)
            .env("ACTIDASH_URL", format!("http://127.0.0.1:{}", d.api_port))
            .env("ACTIDASH_TOKEN", &token)
            .env("ACTIDASH_DESKTOP_PROBE", &probe)
            .output()
            .expect("running xvfb-run")
    };
    let out = run(&shot);
    assert!(
        out.status.success(),
        "the desktop app did not show its Overview ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&probe).unwrap()).unwrap();
    let orders = orders_today(&d);
    assert!(orders > 0);
    assert_eq!(shown_number(&shown["orders"]), Some(orders), "the window shows {shown}");
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "the screenshot is empty");
    assert_eq!(shown["__stale"], "false");

    // Started again with the cloud gone: the last figures, marked stale.
    assert!(cloud.terminate(Duration::from_secs(10)));
    std::fs::remove_file(&probe).unwrap();
    let out = run(&shot.with_file_name("desktop-offline.png"));
    assert!(
        out.status.success(),
        "offline, the app showed nothing ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let offline: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&probe).unwrap()).unwrap();
    assert_eq!(offline["__stale"], "true", "{offline}");
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
}
