// The desktop app's part: the connection dialog (checked before it is saved), saved
// connections in the OS's configuration folder (through the app's commands), and the probe a
// test reads. In the browser, none of this runs.

import { alertState } from "./alerts";
import { apiBase, desktop, setConnection, token } from "./api";
import { esc } from "./format";

interface Connection {
  url: string;
  token: string;
}

type Invoke = (cmd: string, args?: Record<string, unknown>) => Promise<unknown>;

function invoke(): Invoke | null {
  const internals = (window as unknown as { __TAURI_INTERNALS__?: { invoke: Invoke } }).__TAURI_INTERNALS__;
  return internals ? internals.invoke : null;
}

async function saved(): Promise<Connection[]> {
  try {
    const text = (await invoke()?.("load_connections")) as string | undefined;
    const list = JSON.parse(text ?? "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

async function save(c: Connection): Promise<void> {
  const list = (await saved()).filter((x) => x.url !== c.url);
  list.unshift(c);
  await invoke()?.("save_connections", { json: JSON.stringify(list) });
}

/** Checks a connection by reading a report with it; the error says what went wrong. */
async function check(c: Connection): Promise<void> {
  let response: Response;
  try {
    response = await fetch(`${c.url.replace(/\/+$/, "")}/api/v1/events`, { headers: { Authorization: `Bearer ${c.token}` } });
  } catch (e) {
    throw new Error(`${c.url} cannot be reached (${(e as Error).message}); check the address and that the cloud allows this app's origin ([serve] cors_origins)`);
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error ?? `HTTP ${response.status}`);
  }
}

/**
 * Before the app starts: a connection is needed. One named by the environment (a preset) or
 * the last saved one is used; otherwise the dialog asks for one. Resolves when connected.
 */
export async function connect(root: HTMLElement): Promise<void> {
  if (!desktop) return;
  const preset = (window as unknown as { __ACTIDASH_PRESET__?: Connection }).__ACTIDASH_PRESET__;
  const list = await saved();
  const choosing = sessionStorage.getItem(CHOOSE) === "1";
  sessionStorage.removeItem(CHOOSE);
  const first = preset ?? list[0];
  if (!choosing && first && apiBase() === "") setConnection(first.url, first.token);
  if (!choosing && apiBase() && token()) return;
  await new Promise<void>((done) => {
    root.innerHTML = `
      <section class="panel signin" id="connection">
        <h2>Connect to ActiDash</h2>
        <p>The address of your ActiDash API and an API token (from your administrator:
        <code>cloud-aggregator api-token create --tenant … --role viewer</code>).</p>
        ${list.length > 0 ? `<p><label>Saved <select id="saved">${list.map((c, i) => `<option value="${i}">${esc(c.url)}</option>`).join("")}</select></label></p>` : ""}
        <form id="connect">
          <p><label>API address <input id="url" type="url" required placeholder="https://actidash.example.com" size="40" /></label></p>
          <p><label>Token <input id="conn-token" type="password" required autocomplete="off" size="60" /></label></p>
          <p><button type="submit">Connect</button> <span id="conn-error" class="error" role="alert"></span></p>
        </form>
      </section>`;
    const select = root.querySelector<HTMLSelectElement>("#saved");
    const fill = (c: Connection | undefined) => {
      if (!c) return;
      root.querySelector<HTMLInputElement>("#url")!.value = c.url;
      root.querySelector<HTMLInputElement>("#conn-token")!.value = c.token;
    };
    fill(list[0]);
    if (select) select.onchange = () => fill(list[Number(select.value)]);
    root.querySelector<HTMLFormElement>("#connect")!.onsubmit = async (ev) => {
      ev.preventDefault();
      const c = {
        url: root.querySelector<HTMLInputElement>("#url")!.value.trim(),
        token: root.querySelector<HTMLInputElement>("#conn-token")!.value.trim(),
      };
      const error = root.querySelector<HTMLElement>("#conn-error")!;
      error.textContent = "Checking…";
      try {
        await check(c);
        await save(c);
        setConnection(c.url, c.token);
        done();
      } catch (e) {
        error.textContent = (e as Error).message;
      }
    };
  });
}

const CHOOSE = "actidash.choose";

/** In the desktop's header: the connection in use, and a button to switch to another. */
export function connectionControl(host: HTMLElement): void {
  if (!desktop) return;
  const span = document.createElement("span");
  span.className = "connection";
  span.innerHTML = `<span title="The ActiDash API this window reads">${esc(apiBase().replace(/^https?:\/\//, ""))}</span> <button type="button">Switch…</button>`;
  span.querySelector("button")!.onclick = () => {
    sessionStorage.setItem(CHOOSE, "1");
    location.reload();
  };
  host.append(span);
}

/** For a test: what the Overview shows (and the alerts' state), written by the app to the probe file. */
export function probe(page: string, root: HTMLElement, stale = false): void {
  const preset = (window as unknown as { __ACTIDASH_PRESET__?: { probe?: boolean } }).__ACTIDASH_PRESET__;
  if (!desktop || !preset?.probe || page !== "overview") return;
  const figures: Record<string, string> = {};
  for (const e of root.querySelectorAll<HTMLElement>("[data-metric]")) figures[e.dataset.metric!] = e.textContent ?? "";
  figures.__stale = String(stale);
  Object.assign(figures, alertState());
  void invoke()?.("probe", { text: JSON.stringify(figures) });
}
