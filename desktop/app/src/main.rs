//! ActiDash for managers: the dashboards of `desktop/ui` in a desktop window (Tauri 2), talking to
//! an ActiDash cloud's API over HTTP with an API token.
//!
//! The connections (API address and token) are kept in the OS's configuration folder
//! (`connections.json` in Tauri's app config dir, e.g. `~/.config/dev.actidash.desktop/`),
//! read and written through two commands; the settings (`settings.json`: whether new alerts
//! are desktop notifications) beside them. Notifications go through the OS's notification
//! service (tauri-plugin-notification; on Linux the freedesktop D-Bus service). For tests and scripted installs, the environment can
//! name a connection: `ACTIDASH_URL` and `ACTIDASH_TOKEN`. `ACTIDASH_DESKTOP_PROBE=<file>` makes
//! the window write what its Overview shows to that file, so a test can compare it with the API.

#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

use std::path::PathBuf;

use tauri::Manager as _;

/// The saved connections (JSON text, as the app wrote it), or "[]".
#[tauri::command]
fn load_connections(app: tauri::AppHandle) -> String {
    config_file(&app, CONNECTIONS).and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_else(|| "[]".into())
}

/// Saves the connections (JSON text), in the OS's configuration folder.
#[tauri::command]
fn save_connections(app: tauri::AppHandle, json: String) -> Result<(), String> {
    serde_json::from_str::<serde_json::Value>(&json).map_err(|e| format!("not JSON: {e}"))?;
    write_config(&app, CONNECTIONS, &json)
}

const CONNECTIONS: &str = "connections.json";
const SETTINGS: &str = "settings.json";

/// Writes a file of the app's configuration folder whole (a crash leaves the old one).
fn write_config(app: &tauri::AppHandle, name: &str, text: &str) -> Result<(), String> {
    let path = config_file(app, name).ok_or("no configuration folder on this system")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The settings (JSON text, as the app wrote it), or "{}".
#[tauri::command]
fn load_settings(app: tauri::AppHandle) -> String {
    config_file(&app, SETTINGS).and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_else(|| "{}".into())
}

/// Saves the settings (a JSON object).
#[tauri::command]
fn save_settings(app: tauri::AppHandle, json: String) -> Result<(), String> {
    let value = serde_json::from_str::<serde_json::Value>(&json).map_err(|e| format!("not JSON: {e}"))?;
    if !value.is_object() {
        return Err("the settings are a JSON object".into());
    }
    write_config(&app, SETTINGS, &json)
}

/// Shows a desktop notification unless the settings mute them; whether it was shown.
#[tauri::command]
fn notify(app: tauri::AppHandle, title: String, body: String) -> Result<bool, String> {
    use tauri_plugin_notification::NotificationExt as _;
    let settings: serde_json::Value = serde_json::from_str(&load_settings(app.clone())).unwrap_or_default();
    if settings.get("notifications").and_then(serde_json::Value::as_bool) == Some(false) {
        return Ok(false);
    }
    app.notification().builder().title(title).body(body).show().map_err(|e| e.to_string())?;
    Ok(true)
}

/// What the Overview shows, for `ACTIDASH_DESKTOP_PROBE` (a test's file); nothing otherwise.
#[tauri::command]
fn probe(text: String) -> Result<(), String> {
    match std::env::var_os("ACTIDASH_DESKTOP_PROBE") {
        Some(path) => std::fs::write(PathBuf::from(path), text).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

fn config_file(app: &tauri::AppHandle, name: &str) -> Option<PathBuf> {
    app.path().app_config_dir().ok().map(|d| d.join(name))
}

fn main() {
    // WebKit takes the page's default language from the process's locale; "C" (a minimal
    // system, a service's environment) is no language, and the page's number formats refuse it.
    // (WebKit's JavaScript engine reads the C library's locale: LANGUAGE alone does not do.)
    let named =
        |v: &str| std::env::var(v).is_ok_and(|l| !l.is_empty() && l != "C" && !l.starts_with("C.") && l != "POSIX");
    if !named("LC_ALL") && !named("LANG") {
        // SAFETY: at the start of main, before any other thread exists.
        unsafe { std::env::set_var("LANG", "en_US.UTF-8") };
    }
    // A connection named by the environment is offered to the app before its page runs.
    let preset = match (std::env::var("ACTIDASH_URL"), std::env::var("ACTIDASH_TOKEN")) {
        (Ok(url), Ok(token)) => format!(
            "window.__ACTIDASH_PRESET__ = {};",
            serde_json::json!({ "url": url, "token": token, "probe": std::env::var_os("ACTIDASH_DESKTOP_PROBE").is_some() })
        ),
        _ => String::new(),
    };
    let result = tauri::Builder::default()
        .plugin(tauri_plugin_notification::init())
        .invoke_handler(tauri::generate_handler![
            load_connections,
            save_connections,
            load_settings,
            save_settings,
            notify,
            probe
        ])
        .setup(move |app| {
            tauri::WebviewWindowBuilder::new(app, "main", tauri::WebviewUrl::App("index.html".into()))
                .title("ActiDash")
                .inner_size(1280.0, 860.0)
                .min_inner_size(800.0, 560.0)
                .initialization_script(&preset)
                .build()?;
            Ok(())
        })
        .run(tauri::generate_context!());
    if let Err(e) = result {
        eprintln!("actidash-desktop: {e}");
        std::process::exit(1);
    }
}
