//! ActiDash for managers: the dashboards of `desktop/ui` in a desktop window (Tauri 2), talking to
//! an ActiDash cloud's API over HTTP with an API token.
//!
//! The connections (API address and token) are kept in the OS's configuration folder
//! (`connections.json` in Tauri's app config dir, e.g. `~/.config/dev.actidash.desktop/`),
//! read and written through two commands. For tests and scripted installs, the environment can
//! name a connection: `ACTIDASH_URL` and `ACTIDASH_TOKEN`. `ACTIDASH_DESKTOP_PROBE=<file>` makes
//! the window write what its Overview shows to that file, so a test can compare it with the API.

#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

use std::path::PathBuf;

use tauri::Manager as _;

/// The saved connections (JSON text, as the app wrote it), or "[]".
#[tauri::command]
fn load_connections(app: tauri::AppHandle) -> String {
    connections_file(&app).and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_else(|| "[]".into())
}

/// Saves the connections (JSON text), in the OS's configuration folder.
#[tauri::command]
fn save_connections(app: tauri::AppHandle, json: String) -> Result<(), String> {
    serde_json::from_str::<serde_json::Value>(&json).map_err(|e| format!("not JSON: {e}"))?;
    let path = connections_file(&app).ok_or("no configuration folder on this system")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))
}

/// What the Overview shows, for `ACTIDASH_DESKTOP_PROBE` (a test's file); nothing otherwise.
#[tauri::command]
fn probe(text: String) -> Result<(), String> {
    match std::env::var_os("ACTIDASH_DESKTOP_PROBE") {
        Some(path) => std::fs::write(PathBuf::from(path), text).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

fn connections_file(app: &tauri::AppHandle) -> Option<PathBuf> {
    app.path().app_config_dir().ok().map(|d| d.join("connections.json"))
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
        .invoke_handler(tauri::generate_handler![load_connections, save_connections, probe])
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
