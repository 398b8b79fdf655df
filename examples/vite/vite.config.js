// Weft's module finds its .wasm and workers with `new URL("…", import.meta.url)`: Vite
// copies them as assets when it builds. Its dependency pre-bundling (dev server) would
// move the module away from them, so leave the package out of it.
export default {
  optimizeDeps: { exclude: ["weft"] },
  build: { target: "es2022" },
};
