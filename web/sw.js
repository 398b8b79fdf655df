// Weft's service worker. It does one thing: streamed downloads, for browsers that cannot
// store downloads in the origin-private file system (see download-writer.js, store
// "stream"). Every other request goes to the network untouched; nothing is cached.
//
// 1. The page posts { weftDownload: { id, path, size } } with a MessagePort. This worker
//    answers { registered: true, confirms: true } on the port (confirms: it sends step 4's
//    { handedOver }; workers from before that did not).
// 2. The page opens `weft-download/<id>/<name>` (under this worker's scope) in a hidden
//    iframe. The response is a ReadableStream with Content-Disposition: attachment, so the
//    browser saves it as a download, writing it to disk as it arrives.
// 3. The page's download writer posts { seq, data } (in file order) on the port; each chunk
//    is acknowledged with { ack: seq } once it is queued and the queue has room (4 MiB):
//    backpressure reaches the sender. { end: true } says every byte was sent; { abort }
//    fails the download (the browser then shows it as failed instead of saving a
//    truncated file).
// 4. The port gets { handedOver: true } only once the browser asked for the download and
//    read every byte of it. A file small enough to fit in the queue may be sent in full
//    before the browser's request arrives (that request goes through the browser process,
//    the port does not), so "every byte was sent" does not mean the browser has it: until
//    it asks, the download stays here, however long after { end } that is.
// 5. Otherwise the port gets { failed: reason } (the browser did not ask for the download
//    within TAKE_MS, or the page saw its iframe show a page instead of saving one: the
//    page posts { weftDownloadFailed: { id, reason } }), or { cancelled } if the browser
//    stopped reading (the user cancelled the download).
"use strict";

const QUEUE_BYTES = 4 * 1024 * 1024;
// How long the browser may take to ask for a download it was told to save.
const TAKE_MS = 30000;
const downloads = new Map(); // id -> { stream, path, size, taken, fail }

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (ev) => ev.waitUntil(self.clients.claim()));

self.addEventListener("message", (ev) => {
  const d = ev.data && ev.data.weftDownload;
  if (d && ev.ports[0]) register(d, ev.ports[0]);
  const f = ev.data && ev.data.weftDownloadFailed;
  if (f && downloads.has(f.id)) downloads.get(f.id).fail(String(f.reason));
  // { weftPing }: the message itself keeps this worker alive during long downloads.
});

function register({ id, path, size }, port) {
  let controller = null;
  let waiting = []; // seqs queued while the queue was full: acknowledged on pull
  let ended = false; // { end } came: close once the browser has read the queue
  const d = { stream: null, path, size, taken: false, fail: null };
  const timer = setTimeout(() => {
    if (!d.taken) d.fail(`it was not started within ${TAKE_MS / 1000} s`);
  }, TAKE_MS);
  const done = () => {
    clearTimeout(timer);
    downloads.delete(id);
    port.onmessage = null;
    notify(id);
  };
  // Confirms the download once the browser asked for it and read all that was queued.
  d.finish = () => {
    if (!ended || !d.taken || !downloads.has(id) || controller.desiredSize < QUEUE_BYTES) return;
    controller.close();
    port.postMessage({ handedOver: true });
    done();
  };
  d.fail = (reason) => {
    if (!downloads.has(id)) return;
    try {
      controller.error(new Error(reason));
    } catch (_) {
      // Already closed or errored.
    }
    port.postMessage({ failed: reason });
    done();
  };
  d.stream = new ReadableStream(
    {
      start(c) {
        controller = c;
      },
      pull() {
        for (const seq of waiting) port.postMessage({ ack: seq });
        waiting = [];
        d.finish();
      },
      cancel(reason) {
        if (!downloads.has(id)) return;
        port.postMessage({ cancelled: String(reason || "by the user") });
        done();
      },
    },
    new ByteLengthQueuingStrategy({ highWaterMark: QUEUE_BYTES }),
  );
  port.onmessage = (ev) => {
    const m = ev.data || {};
    try {
      if (m.data instanceof ArrayBuffer) {
        if (m.data.byteLength > 0) controller.enqueue(new Uint8Array(m.data));
        if (controller.desiredSize > 0) port.postMessage({ ack: m.seq });
        else waiting.push(m.seq);
      } else if (m.end) {
        ended = true;
        d.finish();
      } else if (m.abort) {
        controller.error(new Error(String(m.abort)));
        done();
      }
    } catch (e) {
      port.postMessage({ cancelled: String((e && e.message) || e) });
      done();
    }
  };
  downloads.set(id, d);
  port.postMessage({ registered: true, confirms: true });
}

// Tells the pages that a download's stream ended (they remove its iframe).
async function notify(id) {
  const pages = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
  for (const page of pages) page.postMessage({ weftDownloadDone: id });
}

// RFC 6266 / RFC 5987: a plain ASCII fallback plus the exact name in UTF-8.
function disposition(path) {
  const name = String(path).split("/").pop() || "download";
  const ascii = name.replace(/[^\x20-\x7e]|["\\%;]/g, "_");
  const utf8 = encodeURIComponent(name).replace(/['()*]/g, (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase());
  return `attachment; filename="${ascii}"; filename*=UTF-8''${utf8}`;
}

self.addEventListener("fetch", (ev) => {
  const prefix = new URL("weft-download/", self.registration.scope).pathname;
  const url = new URL(ev.request.url);
  if (url.origin !== self.location.origin || !url.pathname.startsWith(prefix)) return;
  const id = url.pathname.slice(prefix.length).split("/")[0];
  const d = downloads.get(id);
  if (!d || d.taken) {
    ev.respondWith(new Response("This download is no longer available.", { status: 404 }));
    return;
  }
  d.taken = true;
  const headers = {
    "Content-Type": "application/octet-stream",
    "Content-Disposition": disposition(d.path),
    "X-Content-Type-Options": "nosniff",
  };
  if (Number.isSafeInteger(d.size)) headers["Content-Length"] = String(d.size);
  ev.respondWith(new Response(d.stream, { headers }));
  // A download whose every byte was sent before the browser asked for it ends now.
  d.finish();
});
