// Streamed browser downloads through Weft's service worker (web/sw.js), for browsers that
// cannot store downloads in the origin-private file system. Used by wasm/src/files.rs.

let worker = null; // Promise<ServiceWorkerRegistration> with an active worker
const frames = new Map(); // download id -> hidden iframe
let ping = null;

function registration() {
  if (!worker) {
    worker = (async () => {
      if (!("serviceWorker" in navigator)) {
        throw new Error("this browser has neither OPFS nor service workers, so it cannot save downloads");
      }
      const reg = await navigator.serviceWorker.register(new URL("sw.js", document.baseURI));
      const sw = reg.active || reg.waiting || reg.installing;
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
        resolve();
      }
    };
  });
  reg.active.postMessage({ weftDownload: { id, path, size } }, [channel.port1]);
  await registered;
  channel.port2.onmessage = null;
  const name = String(path).split("/").pop() || "download";
  const frame = document.createElement("iframe");
  frame.hidden = true;
  frame.src = new URL(`weft-download/${id}/${encodeURIComponent(name)}`, reg.scope).href;
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
