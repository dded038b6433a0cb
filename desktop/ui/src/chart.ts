// Time series charts (uPlot): one per page, redrawn in place when its data changes.

import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

export interface Series {
  label: string;
  values: (number | null)[];
}

const COLORS = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2"];

/**
 * Draws `series` over `times` (unix seconds) into `el`. The element keeps its chart: a second
 * call with the same series names only swaps the data.
 */
export function lineChart(
  el: HTMLElement,
  times: number[],
  series: Series[],
  range: { from: string; to: string },
  unit = "",
): void {
  const data: uPlot.AlignedData = [times, ...series.map((s) => s.values)];
  const key = series.map((s) => s.label).join("|");
  const holder = el as HTMLElement & { _plot?: uPlot; _key?: string; _range?: [number, number] };
  // The x axis spans the selected range, whatever the data covers (and the whole of a bucket
  // that starts before it).
  holder._range = [Math.min(Number(range.from), times[0] ?? Infinity), Math.max(Number(range.to), times[times.length - 1] ?? -Infinity)];
  const width = Math.max(320, el.clientWidth || 800);
  if (holder._plot && holder._key === key) {
    holder._plot.setData(data);
    holder._plot.setSize({ width, height: 260 });
    el.dataset.points = String(times.length);
    return;
  }
  holder._plot?.destroy();
  el.innerHTML = "";
  const opts: uPlot.Options = {
    width,
    height: 260,
    scales: { x: { time: true, range: (): uPlot.Range.MinMax => holder._range ?? [null, null] } },
    axes: [{}, { label: unit, size: 70 }],
    series: [
      {},
      ...series.map((s, i) => ({
        label: s.label,
        stroke: COLORS[i % COLORS.length],
        width: 2,
        points: { show: times.length < 60 },
      })),
    ],
  };
  holder._plot = new uPlot(opts, data, el);
  holder._key = key;
  // Follow the panel's width (a laptop screen, a wide monitor, a resized window).
  const resize = new ResizeObserver(() => {
    if (el.clientWidth > 0) holder._plot?.setSize({ width: el.clientWidth, height: 260 });
  });
  resize.observe(el);
  el.dataset.points = String(times.length);
}

/** Buckets of a series response (ISO times) as unix seconds, sorted and distinct. */
export function bucketTimes(rows: { bucket?: string }[]): number[] {
  const set = new Set<number>();
  for (const r of rows) if (r.bucket) set.add(Date.parse(r.bucket) / 1000);
  return [...set].sort((a, b) => a - b);
}
