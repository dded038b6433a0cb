// The app shell: navigation, the time range, the live status, and one page at a time.

import "./style.css";
import { ApiError, follow, setToken, token, type LiveState } from "./api";
import { time } from "./format";
import { alertsControl, refreshAlerts } from "./alerts";
import { connect, connectionControl, probe } from "./desktop";
import { esc } from "./format";
import { FEEDS, FILTERS, RENDER, TITLES, setNavigate } from "./pages";
import { PAGES, RANGES, type View, defaultGranularity, format, parse } from "./view";

const app = document.querySelector<HTMLDivElement>("#app")!;
app.innerHTML = `
  <header>
    <div class="brand">ActiDash</div>
    <nav>${PAGES.map((p) => `<a href="#/${p}" data-page="${p}">${TITLES[p]}</a>`).join("")}</nav>
    <div class="status" id="status" role="status" aria-live="polite"></div>
  </header>
  <div class="toolbar">
    <label>Range <select id="range">${Object.keys(RANGES)
      .map((r) => `<option value="${r}">last ${r}</option>`)
      .join("")}<option value="custom">custom…</option></select></label>
    <span id="custom" hidden>
      <label>from <input type="datetime-local" id="from" step="60" /></label>
      <label>to <input type="datetime-local" id="to" step="60" /></label>
      <button type="button" id="apply">Apply</button>
    </span>
    <label>Granularity <select id="granularity"><option>minute</option><option>hour</option><option>day</option></select></label>
    <span id="filters" class="filters"></span>
    <span class="asof">Data as of <span id="asof">–</span></span>
  </div>
  <div id="banner" class="banner" hidden></div>
  <main id="page" aria-busy="true"><p class="loading">Loading…</p></main>`;

const el = {
  page: document.querySelector<HTMLElement>("#page")!,
  status: document.querySelector<HTMLElement>("#status")!,
  banner: document.querySelector<HTMLElement>("#banner")!,
  asof: document.querySelector<HTMLElement>("#asof")!,
  range: document.querySelector<HTMLSelectElement>("#range")!,
  granularity: document.querySelector<HTMLSelectElement>("#granularity")!,
  custom: document.querySelector<HTMLElement>("#custom")!,
  from: document.querySelector<HTMLInputElement>("#from")!,
  to: document.querySelector<HTMLInputElement>("#to")!,
  apply: document.querySelector<HTMLButtonElement>("#apply")!,
  filters: document.querySelector<HTMLElement>("#filters")!,
};

/** The page's filters: the active ones as removable chips, and a form to add one. */
function renderFilters(): void {
  const dims = FILTERS[view.page];
  if (dims.length === 0) {
    el.filters.innerHTML = "";
    return;
  }
  const chips = dims
    .filter((d) => view.params[d])
    .map(
      (d) =>
        `<span class="chip">${esc(d)} = ${esc(view.params[d])} <button type="button" data-remove="${esc(d)}" aria-label="Remove the ${esc(d)} filter">×</button></span>`,
    )
    .join("");
  el.filters.innerHTML = `${chips}<form id="add-filter" class="add-filter"><select id="filter-dim" aria-label="Filter by">${dims
    .map((d) => `<option>${d}</option>`)
    .join("")}</select><input id="filter-value" placeholder="value, or a,b" aria-label="Filter value" size="12" /><button type="submit">Filter</button></form>`;
  for (const b of el.filters.querySelectorAll<HTMLButtonElement>("button[data-remove]")) {
    b.onclick = () => {
      const params = { ...view.params };
      delete params[b.dataset.remove!];
      navigate({ ...view, params });
    };
  }
  el.filters.querySelector<HTMLFormElement>("#add-filter")!.onsubmit = (ev) => {
    ev.preventDefault();
    const dim = el.filters.querySelector<HTMLSelectElement>("#filter-dim")!.value;
    const value = el.filters.querySelector<HTMLInputElement>("#filter-value")!.value.trim();
    if (value) navigate({ ...view, params: { ...view.params, [dim]: value } });
  };
}

let view: View = parse(location.hash);
let live: LiveState = "connecting";
let lastAsOf = "";
let rendering = false;
let again = false;
let retry: number | undefined;
/** Whether the page on screen is the last figures seen rather than fresh ones. */
let stale = false;

function navigate(next: View): void {
  location.hash = format(next);
}
setNavigate(navigate);

/** UTC ISO minute <-> the datetime-local inputs (shown in UTC, like every figure). */
const toInput = (unix?: string) => (unix ? new Date(Number(unix) * 1000).toISOString().slice(0, 16) : "");
const fromInput = (v: string) => (v ? String(Math.floor(Date.parse(`${v}:00Z`) / 1000)) : undefined);

function syncToolbar(): void {
  el.range.value = view.range;
  el.granularity.value = view.granularity;
  el.custom.hidden = view.range !== "custom";
  el.from.value = toInput(view.from);
  el.to.value = toInput(view.to);
  for (const a of document.querySelectorAll<HTMLAnchorElement>("nav a")) {
    const on = a.dataset.page === view.page;
    a.classList.toggle("on", on);
    a.href = format({ ...view, page: a.dataset.page as View["page"], params: {} });
    if (on) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `${TITLES[view.page]} · ActiDash`;
  renderFilters();
}

el.range.onchange = () => {
  const range = el.range.value;
  if (range === "custom") {
    const now = Math.floor(Date.now() / 60_000) * 60;
    navigate({ ...view, range, from: view.from ?? String(now - 86_400), to: view.to ?? String(now + 60) });
  } else {
    navigate({ ...view, range, from: undefined, to: undefined, granularity: defaultGranularity(range) });
  }
};
el.granularity.onchange = () => navigate({ ...view, granularity: el.granularity.value as View["granularity"] });
el.apply.onclick = () => navigate({ ...view, range: "custom", from: fromInput(el.from.value), to: fromInput(el.to.value) });

function showStatus(): void {
  const text: Record<LiveState, string> = {
    connecting: "Connecting…",
    live: "Live",
    reconnecting: "Disconnected — reconnecting…",
  };
  el.status.textContent = text[live];
  el.status.className = `status ${live}`;
  el.status.dataset.state = live;
  document.body.classList.toggle("stale", live !== "live" || !el.banner.hidden);
}

/** Renders the current page; a render asked for meanwhile runs once after it. */
async function render(): Promise<void> {
  if (rendering) {
    again = true;
    return;
  }
  rendering = true;
  window.clearTimeout(retry);
  const shown = view;
  try {
    el.page.setAttribute("aria-busy", "true");
    const next = document.createElement("div");
    next.className = `page ${shown.page}`;
    // Render off-screen first only on a page change; a refresh updates in place (the charts
    // keep their state).
    const target = el.page.firstElementChild?.classList.contains(shown.page) ? (el.page.firstElementChild as HTMLElement) : next;
    await RENDER[shown.page](shown, target);
    if (target === next) el.page.replaceChildren(next);
    el.banner.hidden = true;
    el.asof.textContent = time(lastAsOf || new Date().toISOString());
    el.page.dataset.page = shown.page;
    el.page.dataset.rendered = String(Date.now());
    remember(shown);
    stale = false;
    probe(shown.page, el.page);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      askForToken(e.message);
      return;
    }
    if (e instanceof ApiError && e.status === 403) {
      // Signed in, but this page is beyond the token's role or tenant: say so, nothing stale.
      el.banner.hidden = true;
      el.page.innerHTML = `<section class="panel"><h2>Not available with this token</h2><p>${esc(e.message)}.
        Ask your administrator for a token with the role this page needs (the Fleet page needs <code>ops</code>).</p></section>`;
      return;
    }
    const message = e instanceof ApiError ? e.message : (e as Error).message;
    let first = !el.page.firstElementChild?.classList.contains(shown.page);
    const cached = first ? recall(shown) : null;
    if (cached) {
      // Nothing on screen yet (a start while the cloud is unreachable): the last figures seen.
      el.page.innerHTML = cached.html;
      el.asof.textContent = time(cached.at);
      first = false;
      stale = true;
      probe(shown.page, el.page, true);
    }
    el.banner.hidden = false;
    el.banner.textContent = first
      ? `Cannot load this page: ${message}. Retrying every 5 seconds; check that the ActiDash cloud is running.`
      : `Stale: the figures below are from ${el.asof.textContent}; refreshing failed (${message}). Retrying every 5 seconds.`;
    if (first) el.page.innerHTML = "";
    retry = window.setTimeout(() => void render(), 5_000);
  } finally {
    el.page.setAttribute("aria-busy", "false");
    rendering = false;
    showStatus();
    if (again) {
      again = false;
      void render();
    }
  }
}

const CACHE_PREFIX = "actidash.last.";

/** Keeps the page's figures (not its charts) to show when the cloud cannot be reached. */
function remember(shown: View): void {
  try {
    localStorage.setItem(CACHE_PREFIX + format(shown), JSON.stringify({ html: el.page.innerHTML, at: lastAsOf || new Date().toISOString() }));
  } catch {
    // storage full or refused: nothing to fall back on later, nothing else lost
  }
}

function recall(shown: View): { html: string; at: string } | null {
  try {
    return JSON.parse(localStorage.getItem(CACHE_PREFIX + format(shown)) ?? "null");
  } catch {
    return null;
  }
}

/** The sign-in form: a token refused or missing. */
function askForToken(reason: string): void {
  el.banner.hidden = true;
  el.page.innerHTML = `
    <section class="panel signin">
      <h2>Sign in with an API token</h2>
      <p>${token() ? `The API refused this browser's token: ${reason.replace(/[<>&]/g, "")}.` : "This dashboard needs an API token."}
      Ask your administrator for one (<code>cloud-aggregator api-token create --tenant … --role viewer</code>).</p>
      <form id="signin"><label>Token <input id="token" type="password" autocomplete="off" size="60" required /></label>
      <button type="submit">Sign in</button></form>
    </section>`;
  el.page.querySelector<HTMLFormElement>("#signin")!.onsubmit = (ev) => {
    ev.preventDefault();
    setToken(el.page.querySelector<HTMLInputElement>("#token")!.value);
    location.reload();
  };
}

window.addEventListener("hashchange", () => {
  const next = parse(location.hash);
  if (next.page !== view.page) el.page.innerHTML = '<p class="loading">Loading…</p>';
  view = next;
  syncToolbar();
  void render();
});

async function start(): Promise<void> {
  syncToolbar();
  await connect(el.page);
  const header = document.querySelector<HTMLElement>("header")!;
  connectionControl(header);
  await alertsControl(header, el.status);
  const reprobe = () => probe(view.page, el.page, stale);
  follow(
    (changed, asOf) => {
      lastAsOf = asOf;
      if (changed.some((c) => FEEDS[view.page].includes(c))) void render();
      if (changed.includes("inventory") || changed.includes("fleet")) void refreshAlerts(reprobe);
    },
    (state) => {
      const was = live;
      live = state;
      showStatus();
      if (was !== "live" && state === "live") void render();
    },
  );

  if (!location.hash) history.replaceState(null, "", format(view));
  syncToolbar();
  showStatus();
  void render();
  void refreshAlerts(reprobe);
}

void start();
