// Streamed browser downloads through Weft's service worker (web/sw.js), for browsers that
// cannot store downloads in the origin-private file system. It lives beside the module
// (pkg/, as the workers) and is imported the first time a download streams
// (wasm/js/module-assets.js): a page that stores downloads in OPFS never loads it.

let worker = null; // Promise<ServiceWorkerRegistration> with an active worker
const frames = new Map(); // download id -> hidden iframe
let ping = null;

function registration() {
  if (!worker) {
    worker = (async () => {
      if (!("serviceWorker" in navigator)) {
        throw new Error("this browser has neither OPFS nor service workers, so it cannot save downloads");
      }
      // Beside the module (pkg/, where this file lives too), never relative to the page;
      // its scope is that folder, and the downloads it serves are opened under it.
      const reg = await navigator.serviceWorker.register(new URL("./sw.js", import.meta.url));
      // A newer worker being installed (the app was updated) takes over at once (it skips
      // waiting): wait for it rather than talk to the one it replaces.
      const sw = reg.installing || reg.waiting || reg.active;
      if (sw && sw.state !== "activated") {
        await new Promise((resolve, reject) => {
          sw.addEventListener("statechange", () => {
            if (sw.state === "activated") resolve();
            if (sw.state === "redundant") reject(new Error("the service worker failed to start"));
          });
        });
      }
      navigator.serviceWorker.addEventListener("message", (ev) => {
        const id = ev.data && ev.data.weftDownloadDone;
        if (id === undefined) return;
        // The browser's download owns the response by now: the iframe can go.
        const frame = frames.get(id);
        frames.delete(id);
        if (frame) setTimeout(() => frame.remove(), 1000);
        if (frames.size === 0 && ping !== null) {
          clearInterval(ping);
          ping = null;
        }
      });
      return reg;
    })();
    worker.catch(() => {
      worker = null;
    });
  }
  return worker;
}

/// Starts a browser download of `size` bytes named after the last part of `path`, and
/// resolves to the MessagePort that feeds it (see web/sw.js for what goes over it).
export async function startStreamDownload(path, size) {
  const reg = await registration();
  const id = crypto.randomUUID();
  const channel = new MessageChannel();
  const registered = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the service worker did not answer")), 10000);
    channel.port2.onmessage = (ev) => {
      if (ev.data && ev.data.registered) {
        clearTimeout(timer);
        resolve(ev.data.confirms === true);
      }
    };
  });
  reg.active.postMessage({ weftDownload: { id, path, size } }, [channel.port1]);
  // An older worker (from before an update) never confirms that the browser took a
  // download, so the file could not be announced complete: fail it plainly instead.
  if (!(await registered)) throw new Error("an older version of the app is still running: reload the page");
  channel.port2.onmessage = null;
  const name = String(path).split("/").pop() || "download";
  const frame = document.createElement("iframe");
  frame.hidden = true;
  frame.src = new URL(`weft-download/${id}/${encodeURIComponent(name)}`, reg.scope).href;
  // A frame whose navigation became a download loads no document. One that does showed a
  // page (an error, say) instead of saving the file: fail the download rather than let
  // the file vanish (the service worker ignores this once the browser read every byte).
  frame.addEventListener("load", () => {
    if (reg.active) reg.active.postMessage({ weftDownloadFailed: { id, reason: "a page was shown instead" } });
  });
  document.body.appendChild(frame);
  frames.set(id, frame);
  // A service worker idles out after about 30 s without events; a long download is
  // streamed through it, so keep it awake while any is running.
  if (ping === null) {
    ping = setInterval(() => {
      if (reg.active) reg.active.postMessage({ weftPing: true });
    }, 10000);
  }
  return channel.port2;
}
