// Weft's disk writer: a dedicated worker that writes verified chunks of downloads in
// place into the origin-private file system through sync access handles, so a file
// never sits in memory and a partial download survives a reload (unlike writable
// streams, which write to a swap file that only replaces the file on close).
//
// Requests (postMessage): { id, op, name, ... } with
//   op "write":  offset, data (ArrayBuffer, transferred)   -> { id, ok: true, data } (the
//                buffer, transferred back for reuse)
//   op "close":  closes the handle (flushes)               -> { id, ok: true }
//   op "delete": closes and removes the file               -> { id, ok: true }
// Any failure answers { id, ok: false, error, disk_full }.
"use strict";

const DIR = "weft-downloads";
const handles = new Map(); // name -> Promise<FileSystemSyncAccessHandle>
let dirPromise = null;
let writesSinceFlush = 0;

function dir() {
  if (!dirPromise) {
    dirPromise = navigator.storage.getDirectory().then((root) => root.getDirectoryHandle(DIR, { create: true }));
  }
  return dirPromise;
}

function handle(name) {
  let h = handles.get(name);
  if (!h) {
    h = dir()
      .then((d) => d.getFileHandle(name, { create: true }))
      .then((f) => f.createSyncAccessHandle());
    handles.set(name, h);
    h.catch(() => handles.delete(name));
  }
  return h;
}

async function close(name) {
  const h = handles.get(name);
  if (!h) return;
  handles.delete(name);
  try {
    const access = await h;
    access.flush();
    access.close();
  } catch (_) {
    // Never opened: nothing to close.
  }
}

// Requests run one at a time, in order.
let chain = Promise.resolve();

async function run(msg) {
  switch (msg.op) {
    case "write": {
      const access = await handle(msg.name);
      const data = new Uint8Array(msg.data);
      let written = 0;
      while (written < data.length) {
        const n = access.write(data.subarray(written), { at: msg.offset + written });
        if (n <= 0) throw new DOMException("no space left for the download", "QuotaExceededError");
        written += n;
      }
      if (++writesSinceFlush >= 64) {
        writesSinceFlush = 0;
        access.flush();
      }
      return;
    }
    case "close":
      return close(msg.name);
    case "delete": {
      await close(msg.name);
      const d = await dir();
      try {
        await d.removeEntry(msg.name);
      } catch (e) {
        if (e.name !== "NotFoundError") throw e;
      }
      return;
    }
    default:
      throw new Error("unknown op " + msg.op);
  }
}

self.onmessage = (ev) => {
  const msg = ev.data;
  chain = chain.then(async () => {
    // The chunk's buffer goes back to the page for reuse, so a download does not
    // leave a trail of garbage buffers behind it.
    const back = msg.data instanceof ArrayBuffer ? [msg.data] : [];
    try {
      await run(msg);
      self.postMessage({ id: msg.id, ok: true, data: msg.data }, back);
    } catch (e) {
      const diskFull = e && e.name === "QuotaExceededError";
      const error = String((e && e.message) || e);
      self.postMessage({ id: msg.id, ok: false, error, disk_full: diskFull, data: msg.data }, back);
    }
  });
};
