// Numbers, money and times in the user's locale. Money arrives as exact decimal text and is
// only turned into a number for display.

/**
 * The user's locale, or the runtime's default where the system names none a browser accepts
 * (a desktop started with `LANG=C` reports "C", which Intl refuses).
 */
const locale: string = (() => {
  for (const l of navigator.languages ?? [navigator.language]) {
    try {
      const [canonical] = Intl.getCanonicalLocales(l);
      if (canonical) return canonical;
    } catch {
      // not a language tag: try the next
    }
  }
  return "en-US";
})();

export function money(text: string | null | undefined, currency: string | undefined): string {
  if (text === null || text === undefined) return "–";
  const value = Number(text);
  if (!Number.isFinite(value)) return text;
  if (!currency || !/^[A-Z]{3}$/.test(currency)) return number(value, 2);
  try {
    return new Intl.NumberFormat(locale, { style: "currency", currency }).format(value);
  } catch {
    return `${number(value, 2)} ${currency}`;
  }
}

export function number(value: number | string | null | undefined, digits = 0): string {
  if (value === null || value === undefined) return "–";
  const n = typeof value === "string" ? Number(value) : value;
  if (!Number.isFinite(n)) return String(value);
  return new Intl.NumberFormat(locale, { maximumFractionDigits: digits, minimumFractionDigits: 0 }).format(n);
}

export function percent(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return new Intl.NumberFormat(locale, { style: "percent", maximumFractionDigits: 1 }).format(value);
}

export function duration(secs: number | null | undefined): string {
  if (secs === null || secs === undefined || !Number.isFinite(secs)) return "–";
  if (secs < 60) return `${number(secs, 1)} s`;
  const m = Math.floor(secs / 60);
  const s = Math.round(secs % 60);
  return m < 60 ? `${m} min ${s} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function time(iso: string | null | undefined): string {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return new Intl.DateTimeFormat(locale, { dateStyle: "medium", timeStyle: "medium" }).format(d);
}

export function ago(iso: string | null | undefined, now = Date.now()): string {
  if (!iso) return "never";
  const t = new Date(iso).getTime();
  if (Number.isNaN(t)) return iso;
  const secs = Math.max(0, Math.round((now - t) / 1000));
  if (secs < 60) return `${secs} s ago`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min ago`;
  return `${Math.floor(secs / 3600)} h ago`;
}

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${number(v, i === 0 ? 0 : 1)} ${units[i]}`;
}

/** Text-safe HTML. */
export function esc(s: unknown): string {
  return String(s ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
