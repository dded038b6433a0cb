// The dashboards in a real browser (Debian's chromium through playwright-core), against a real
// deployment fed by an agent. Driven by tests/tests/ui.rs, which starts the deployment and
// answers this script's requests on stdin/stdout:
//   "APPEND" -> the test appends records on-prem and answers "OK"
//   "STOP"   -> the test stops the cloud and answers "OK"
// Environment: ACTIDASH_URL (the API and app), ACTIDASH_TOKEN (an API token of role ops for the
// tenant), ACTIDASH_CHROMIUM (the browser),
// ACTIDASH_SCREENSHOTS (where every page's screenshot goes), ACTIDASH_FROM/ACTIDASH_TO (unix
// seconds: a range holding all the data).

import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const base = process.env.ACTIDASH_URL;
const shots = process.env.ACTIDASH_SCREENSHOTS;
const from = process.env.ACTIDASH_FROM;
const to = process.env.ACTIDASH_TO;
const token = process.env.ACTIDASH_TOKEN;
if (!base || !shots || !from || !to || !token) {
  throw new Error("ACTIDASH_URL, ACTIDASH_SCREENSHOTS, ACTIDASH_FROM, ACTIDASH_TO and ACTIDASH_TOKEN are needed");
}
mkdirSync(shots, { recursive: true });

const stdin = createInterface({ input: process.stdin });
const lines = stdin[Symbol.asyncIterator]();
async function ask(request) {
  process.stdout.write(`${request}\n`);
  const answer = await lines.next();
  if (answer.done || answer.value.trim() !== "OK") throw new Error(`the test did not do ${request}: ${answer.value}`);
}

async function api(path) {
  const r = await fetch(`${base}${path}`, { headers: { Authorization: `Bearer ${token}` } });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

/** A number as the page shows it (locale digits, currency symbol) back to a number. */
function parse(text) {
  const cleaned = text.replace(/[^0-9.\-]/g, "");
  const n = Number(cleaned);
  if (cleaned === "" || !Number.isFinite(n)) throw new Error(`not a number on the page: ${JSON.stringify(text)}`);
  return n;
}

let checked = 0;
function same(what, shown, expected, tolerance = 0) {
  if (Math.abs(shown - expected) > tolerance) throw new Error(`${what}: the page shows ${shown}, the API says ${expected}`);
  checked++;
}

const browser = await chromium.launch({
  executablePath: process.env.ACTIDASH_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const page = await browser.newPage({ viewport: { width: 1440, height: 1000 }, locale: "en-US" });
const errors = [];
page.on("pageerror", (e) => errors.push(e.message));

const range = `range=custom&from=${from}&to=${to}`;
async function open(name, query = `${range}&granularity=hour`) {
  await page.goto(`${base}/#/${name}?${query}`);
  await page.waitForSelector(`main[data-page="${name}"][aria-busy="false"]`, { timeout: 20_000 });
}
async function text(selector) {
  return (await page.locator(selector).first().textContent({ timeout: 10_000 })) ?? "";
}
const metric = (name) => `[data-metric="${name}"]`;

try {
  // Without a token: the sign-in form. With a wrong one: the same, saying why. The token in
  // the address signs in and leaves the address.
  await page.goto(`${base}/#/sales`);
  await page.waitForSelector("#signin");
  await page.fill("#token", "adk_wrong");
  await page.click('#signin button[type="submit"]');
  await page.waitForSelector("text=The API refused this browser's token");
  await page.goto(`${base}/?token=${token}#/overview`);
  await page.waitForSelector('main[data-page="overview"][aria-busy="false"]', { timeout: 20_000 });
  if (page.url().includes("token=")) throw new Error(`the token stayed in the address: ${page.url()}`);
  checked++;

  // Every page shows the API's numbers.
  await open("sales");
  const sales = await api(`/api/v1/sales?from=${from}&to=${to}&group_by=channel,currency`);
  if (sales.rows.length === 0) throw new Error("no sales in the range: nothing to compare");
  for (const r of sales.rows) {
    same(`orders of ${r.channel} ${r.currency}`, parse(await text(metric(`orders.${r.channel}.${r.currency}`))), r.orders);
    same(`revenue of ${r.channel} ${r.currency}`, parse(await text(metric(`revenue.${r.channel}.${r.currency}`))), Number(r.revenue), 0.005);
  }
  await page.screenshot({ path: join(shots, "sales.png") });
  // A filter narrows the page and goes into the address; removing it widens again.
  const channel = sales.rows[0].channel;
  await page.selectOption("#filter-dim", "channel");
  await page.fill("#filter-value", channel);
  await page.click('#add-filter button[type="submit"]');
  await page.waitForFunction((c) => location.hash.includes(`channel=${c}`), channel);
  await page.waitForSelector(".chip");
  await page.waitForFunction(
    (c) => [...document.querySelectorAll("[data-metric^='orders.']")].every((e) => e.getAttribute("data-metric").startsWith(`orders.${c}.`)),
    channel,
  );
  const filtered = await api(`/api/v1/sales?from=${from}&to=${to}&group_by=channel,currency&channel=${channel}`);
  for (const r of filtered.rows) {
    same(`filtered orders of ${r.channel} ${r.currency}`, parse(await text(metric(`orders.${r.channel}.${r.currency}`))), r.orders);
  }
  await page.click(".chip button");
  await page.waitForFunction((c) => !location.hash.includes(`channel=${c}`), channel);

  await open("marketing", `${range}&granularity=hour&model=linear`);
  const attribution = await api(`/api/v1/marketing/attribution?from=${from}&to=${to}&model=linear&group_by=channel,campaign`);
  for (const r of attribution.rows) {
    const key = `${r.channel}/${r.campaign}.${r.currency}`;
    same(`linear orders of ${key}`, parse(await text(metric(`attributed-orders.${key}`))), Number(r.attributed_orders), 0.005);
  }
  same("credited orders", parse(await text(metric("credited-orders"))), Number(attribution.orders), 0.005);
  await page.screenshot({ path: join(shots, "marketing.png") });
  // The model switch.
  await page.click('button[data-model="first_touch"]');
  await page.waitForFunction(() => location.hash.includes("model=first_touch"));
  await page.waitForSelector('button[data-model="first_touch"][aria-pressed="true"]');

  await open("behavior");
  const behavior = await api(`/api/v1/behavior?from=${from}&to=${to}`);
  same("sessions", parse(await text(metric("sessions"))), behavior.sessions[0]?.sessions ?? 0);
  same("page views", parse(await text(metric("page-views"))), behavior.page_views);
  const funnel = await api(`/api/v1/behavior/funnel?from=${from}&to=${to}`);
  for (const s of funnel.steps) same(`funnel ${s.step}`, parse(await text(metric(`funnel.${s.step}`))), s.sessions);
  await page.screenshot({ path: join(shots, "behavior.png") });

  await open("inventory");
  const inventory = await api("/api/v1/inventory?limit=200");
  same("units on hand", parse(await text(metric("total-on-hand"))), inventory.total_on_hand);
  same("SKUs", parse(await text(metric("skus"))), inventory.skus);
  await page.screenshot({ path: join(shots, "inventory.png") });

  // The header's alerts: the count and the list are the API's.
  const alerts = (await api("/api/v1/alerts")).alerts;
  await page.waitForSelector(`.alerts-button[data-count="${alerts.length}"]`, { timeout: 30_000 });
  await page.click(".alerts-button");
  same("alerts listed", await page.locator("#alert-list li").count(), alerts.length);
  if (alerts.length > 0 && !(await text("#alert-list li")).includes(alerts[0].message)) {
    throw new Error(`the first alert listed is not the API's first: ${alerts[0].message}`);
  }
  await page.screenshot({ path: join(shots, "alerts.png") });
  await page.keyboard.press("Escape");

  await open("fleet");
  const { agents } = await api("/api/v1/fleet");
  const label = { healthy: "healthy", degraded: "degraded", cut_off: "cut off", offline: "offline", revoked: "revoked" };
  for (const a of agents) {
    if ((await text(metric(`agent.${a.agent_id}`))) !== a.agent_id) throw new Error(`agent ${a.agent_id} is not listed`);
    const shown = await text(metric(`state.${a.agent_id}`));
    if (!shown.startsWith(label[a.health.state])) {
      throw new Error(`agent ${a.agent_id} is ${a.health.state} in the API, the page says: ${shown}`);
    }
    for (const r of a.health.reasons) {
      if (!shown.includes(r.message)) throw new Error(`agent ${a.agent_id}: reason not shown: ${r.message}`);
    }
    checked++;
  }
  await page.screenshot({ path: join(shots, "fleet.png") });

  // The time range and granularity change the chart (and the URL).
  await open("sales", `${range}&granularity=minute`);
  const minutes = Number(await page.locator("#sales-chart").getAttribute("data-points"));
  await page.selectOption("#granularity", "hour");
  await page.waitForFunction(() => location.hash.includes("granularity=hour"));
  await page.waitForFunction(
    (before) => Number(document.querySelector("#sales-chart")?.getAttribute("data-points")) !== before,
    minutes,
    { timeout: 10_000 },
  );
  const hours = Number(await page.locator("#sales-chart").getAttribute("data-points"));
  if (!(minutes > hours && hours >= 1)) throw new Error(`per minute ${minutes} points, per hour ${hours}: expected fewer per hour`);
  await page.selectOption("#range", "15m");
  await page.waitForFunction(() => location.hash.includes("range=15m"));

  // The overview changes live when records arrive on-prem, without a reload.
  await open("overview", "range=1h&granularity=minute");
  await page.waitForSelector('#status[data-state="live"]', { timeout: 20_000 });
  const overview = await api(`/api/v1/sales?from=${Math.floor(Date.now() / 86_400_000) * 86_400}&to=${Math.floor(Date.now() / 86_400_000) * 86_400 + 86_400}`);
  same("orders today", parse(await text(metric("orders"))), overview.rows.reduce((n, r) => n + r.orders, 0));
  await page.screenshot({ path: join(shots, "overview.png") });
  await page.evaluate(() => {
    window.__sameDocument = true;
  });
  const before = parse(await text(metric("orders")));
  await ask("APPEND");
  await page.waitForFunction(
    ([sel, n]) => Number((document.querySelector(sel)?.textContent ?? "").replace(/[^0-9.\-]/g, "")) > n,
    [metric("orders"), before],
    { timeout: 30_000 },
  );
  if (!(await page.evaluate(() => window.__sameDocument === true))) throw new Error("the page reloaded to show new numbers");
  checked++;

  // The stale state when the API goes away: the last figures stay, marked.
  const shown = await text(metric("orders"));
  await ask("STOP");
  await page.waitForSelector('#status[data-state="reconnecting"]', { timeout: 30_000 });
  if ((await text(metric("orders"))) !== shown) throw new Error("the last figures did not stay on screen");
  await page.screenshot({ path: join(shots, "stale.png") });
  checked++;


  if (errors.length > 0) throw new Error(`errors in the page: ${errors.join("; ")}`);
  process.stdout.write(`DONE ${checked} checks\n`);
} finally {
  await browser.close();
  stdin.close();
}
