// P9 of ../shared/TARGETS.md, for `actidash-bench api`: how long each dashboard page takes to
// show its numbers after it is opened (a fresh browser context each time: nothing cached), and
// how long a range change takes to redraw, over the deployment's 30 days of data.
// Environment: ACTIDASH_URL, ACTIDASH_TOKEN, ACTIDASH_CHROMIUM, ACTIDASH_ROUNDS (default 5).
// Prints one JSON line: {"open": {page: [ms…]}, "range_change": [ms…]}.

import { chromium } from "playwright-core";

const base = process.env.ACTIDASH_URL;
const token = process.env.ACTIDASH_TOKEN;
const rounds = Number(process.env.ACTIDASH_ROUNDS || 5);
const browser = await chromium.launch({
  executablePath: process.env.ACTIDASH_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const pages = ["overview", "sales", "marketing", "behavior", "inventory", "fleet"];
const open = Object.fromEntries(pages.map((p) => [p, []]));
const rangeChange = [];
try {
  for (let round = 0; round < rounds; round++) {
    for (const name of pages) {
      const context = await browser.newContext({ viewport: { width: 1440, height: 1000 } });
      const page = await context.newPage();
      await page.goto(`${base}/?token=${token}#/overview`);
      await page.waitForSelector('main[aria-busy="false"][data-page="overview"]', { timeout: 30_000 });
      // Opening: a full load of the page's address (the app's files from the browser's cache,
      // as for a returning user), until its numbers are on screen.
      await page.goto("about:blank");
      const t0 = performance.now();
      await page.goto(`${base}/#/${name}?range=30d&granularity=day`);
      await page.waitForSelector(`main[aria-busy="false"][data-page="${name}"]`, { timeout: 30_000 });
      open[name].push(performance.now() - t0);
      if (name === "sales") {
        for (const [range, gran] of [["7d", "hour"], ["1d", "hour"], ["30d", "day"]]) {
          const before = await page.getAttribute("main", "data-rendered");
          const t1 = performance.now();
          await page.evaluate(([r, g]) => {
            location.hash = `#/sales?range=${r}&granularity=${g}`;
          }, [range, gran]);
          await page.waitForFunction((b) => document.querySelector("main")?.dataset.rendered !== b, before, { timeout: 30_000 });
          rangeChange.push(performance.now() - t1);
        }
      }
      await context.close();
    }
  }
  process.stdout.write(`${JSON.stringify({ open, range_change: rangeChange })}\n`);
} finally {
  await browser.close();
}
