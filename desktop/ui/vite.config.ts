import { defineConfig } from "vite";

// Built into dist/, served by `cloud-aggregator run --role serve` ([serve] ui_dir) and shipped by
// the desktop app. Relative asset paths: the same build works under any prefix.
export default defineConfig({
  base: "./",
  build: { outDir: "dist", emptyOutDir: true, sourcemap: true },
  server: { proxy: { "/api": "http://127.0.0.1:8080" } },
});
