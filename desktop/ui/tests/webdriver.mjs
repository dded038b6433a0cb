// The desktop app's connection dialog, clicked through over WebDriver (tauri-driver in front of
// Debian's WebKitWebDriver). Driven by tests/tests/desktop.rs under Xvfb. Environment:
// ACTIDASH_DRIVER (tauri-driver's address), ACTIDASH_APP (the app), ACTIDASH_CONNECT_URL and
// ACTIDASH_CONNECT_TOKEN (the connection to type in; not ACTIDASH_URL/TOKEN, which the app would
// take as a preset). Prints one JSON line: what the dialog said to a wrong token, the
// Overview's orders once connected, and the alerts button's count; then it opens the alert list
// and turns desktop notifications off (the test reads the setting the app saved).

import { readFile } from "node:fs/promises";

const driver = process.env.ACTIDASH_DRIVER;
const app = process.env.ACTIDASH_APP;
const url = process.env.ACTIDASH_CONNECT_URL;
const token = process.env.ACTIDASH_CONNECT_TOKEN;
if (!driver || !app || !url || !token) throw new Error("ACTIDASH_DRIVER, ACTIDASH_APP, ACTIDASH_CONNECT_URL and ACTIDASH_CONNECT_TOKEN are needed");
const ELEMENT = "element-6066-11e4-a52e-4f735466cecf";

async function call(method, path, body) {
  const r = await fetch(`${driver}${path}`, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await r.json();
  if (!r.ok) throw new Error(`${method} ${path}: ${JSON.stringify(json.value)}`);
  return json.value;
}

const session = await call("POST", "/session", {
  capabilities: { alwaysMatch: { browserName: "wry", "tauri:options": { application: app } } },
});
const s = `/session/${session.sessionId}`;

async function find(css, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const found = await call("POST", `${s}/elements`, { using: "css selector", value: css });
    if (found.length > 0) return found[0][ELEMENT];
    if (Date.now() > deadline) throw new Error(`no ${css} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
// Read in the page in one step: a live page re-renders, and an element found a moment ago may be
// gone (a "stale element reference") by the time its text is asked for.
async function text(css, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const got = await call("POST", `${s}/execute/sync`, {
      script: "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
      args: [css],
    });
    if (got !== null) return got;
    if (Date.now() > deadline) throw new Error(`no ${css} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
async function type(css, value) {
  const id = await find(css);
  await call("POST", `${s}/element/${id}/clear`, {});
  await call("POST", `${s}/element/${id}/value`, { text: value });
}
const click = async (css) => call("POST", `${s}/element/${await find(css)}/click`, {});

try {
  // A wrong token: the dialog says why and stays.
  await type("#url", url);
  await type("#conn-token", "adk_wrong");
  await click('#connect button[type="submit"]');
  let wrong = "";
  for (let i = 0; i < 100 && (wrong === "" || wrong === "Checking…"); i++) {
    wrong = await text("#conn-error");
    await new Promise((r) => setTimeout(r, 100));
  }
  // The right one: the Overview.
  await type("#conn-token", token);
  await click('#connect button[type="submit"]');
  await find('main[data-page="overview"][aria-busy="false"]', 30_000).catch(async (e) => {
    const said = await text("#conn-error").catch(() => "(no dialog)");
    const banner = await text("#banner").catch(() => "(no banner)");
    const page = await text("main").catch(() => "(no page)");
    throw new Error(`${e.message}; the dialog says: ${said}; the banner: ${banner}; the page: ${page.slice(0, 300)}`);
  });
  const orders = await text('[data-metric="orders"]');
  // The alerts: the button's count once read, then the list and its notification setting.
  const counted = await find(".alerts-button[data-count]:not([data-count='0'])", 30_000);
  const alerts = await call("GET", `${s}/element/${counted}/attribute/data-count`);
  await click(".alerts-button");
  const listed = (await call("POST", `${s}/elements`, { using: "css selector", value: "#alert-list li" })).length;
  await click("#notifications");
  const muted = !(await call("GET", `${s}/element/${await find("#notifications")}/selected`));
  // The app saves the setting on its own time: wait for the file before the app is closed.
  const settings = `${process.env.XDG_CONFIG_HOME}/dev.actidash.desktop/settings.json`;
  for (let i = 0; i < 100 && !(await readFile(settings, "utf8").catch(() => "")).includes("false"); i++) {
    await new Promise((r) => setTimeout(r, 100));
  }
  process.stdout.write(`${JSON.stringify({ wrong, orders, alerts, listed, muted })}\n`);
} finally {
  await call("DELETE", s).catch(() => {});
}
