import { defineConfig } from "vite";

// Plain files under /assets/, no inline script or style: the API serves them
// with a Content-Security-Policy of 'self' only.
export default defineConfig({
  base: "/",
  build: {
    outDir: "dist",
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    target: "es2022",
  },
});
