// Where the files that travel with the wasm module are: beside `weft_wasm.js` (in the
// bundle's `pkg/` and in the npm package), found from this file's own URL
// (`pkg/snippets/<crate>/js/module-assets.js`), never from the page's address. A page at
// `/app/sub/page` once got a 404 for a worker named relative to itself, and every download
// hung. Static `new URL("…", import.meta.url)` literals, so bundlers (Vite) see them.

/// The URL of the download writer worker (web/download-writer.js).
export function downloadWriterUrl() {
  return new URL("../../../download-writer.js", import.meta.url).href;
}

/// Starts a streamed browser download (web/stream-download.js, beside the module),
/// importing that file the first time: only a browser without OPFS, or a page that asks
/// for `downloads: "stream"`, ever streams one, so the others never fetch it.
export async function startStreamDownload(path, size) {
  const streaming = await import("../../../stream-download.js");
  return streaming.startStreamDownload(path, size);
}
