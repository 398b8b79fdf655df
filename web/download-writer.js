// Weft's download writer: a dedicated worker that stores verified chunks of downloads.
//
// Two stores, chosen once when the worker starts (it tells the page which, first thing:
// { hello: true, store }):
//
// - "opfs" (the default wherever the browser has it): chunks are written in place into the
//   origin-private file system through sync access handles, so a file never sits in memory
//   and a partial download survives a reload (unlike writable streams, which write to a
//   swap file that only replaces the file on close).
// - "stream" (browsers without OPFS sync access handles, or `?downloads=stream`): each
//   file becomes one streamed browser download through the service worker (`sw.js`). The
//   page asks the service worker for a download and hands this worker a MessagePort to it.
//   Chunks that arrive out of order wait here until the gap before them is filled, then go
//   to the port in order. A write is answered only once the service worker has queued the
//   chunk and its queue has room, so a slow disk slows the transfer instead of filling
//   memory: at most the engine's bound of unwritten chunks waits here. Such a download
//   cannot resume after a reload.
//
// Requests (postMessage): { id, op, name, ... } with
//   op "begin":  path, size: a file's first write follows   -> { id, ok: true }
//                (in "stream" mode the page is asked for a download: { stream: name,
//                path, size }, answered by op "port")
//   op "port":   port (MessagePort, transferred) to the service worker's download of name
//                (no answer)
//   op "writes": chunk writes in one message (the page sends one per 1 MiB, not one per
//                chunk): ids, names, offsets, lens (arrays, one entry per chunk) and data
//                (ArrayBuffer, transferred) holding the chunks back to back
//                -> { ids, ok: true, data } (the buffer, transferred back for reuse); in
//                "stream" mode each id is answered by itself ({ id, ok }) once the
//                service worker took it, and the buffer comes back with { ids: [] }
//   op "close":  the file is complete: flush and close     -> { id, ok: true }
//                (in "stream" mode only once the service worker says the browser asked
//                for the download and read all of it; if the browser never takes it, the
//                answer is a failure: a complete file is saved or reported failed, never
//                silently lost)
//   op "delete": closes and removes the file (or aborts    -> { id, ok: true }
//                its download)
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

async function chooseStore() {
  if (new URL(self.location.href).searchParams.get("downloads") === "stream") return "stream";
  try {
    const sync = typeof FileSystemFileHandle !== "undefined" && "createSyncAccessHandle" in FileSystemFileHandle.prototype;
    if (!sync || !navigator.storage || !navigator.storage.getDirectory) return "stream";
    await dir(); // throws where OPFS is switched off (some private modes)
    return "opfs";
  } catch (_) {
    dirPromise = null;
    return "stream";
  }
}

// ---- store "opfs"

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

async function runOpfs(msg) {
  switch (msg.op) {
    case "begin":
      return;
    case "writes": {
      const all = new Uint8Array(msg.data);
      let at = 0;
      for (let i = 0; i < msg.ids.length; i++) {
        const access = await handle(msg.names[i]);
        const data = all.subarray(at, at + msg.lens[i]);
        at += msg.lens[i];
        let written = 0;
        while (written < data.length) {
          const n = access.write(data.subarray(written), { at: msg.offsets[i] + written });
          if (n <= 0) throw new DOMException("no space left for the download", "QuotaExceededError");
          written += n;
        }
        if (++writesSinceFlush >= 64) {
          writesSinceFlush = 0;
          access.flush();
        }
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

// ---- store "stream"

// name -> { size, next, port, held: Map(offset -> { id, data }), sent: [id], closing: id|null,
//           ended: bool (every byte went to the service worker), failed: string|null }
const streams = new Map();

function reply(id, ok, error, data) {
  const back = data instanceof ArrayBuffer ? [data] : [];
  self.postMessage({ id, ok, error, disk_full: false, data }, back);
}

// Sends what is in order to the service worker; ends the download once a pending close
// finds all of it acknowledged.
function pump(name) {
  const s = streams.get(name);
  if (!s || !s.port || s.failed || s.ended) return;
  for (let w = s.held.get(s.next); w; w = s.held.get(s.next)) {
    s.held.delete(s.next);
    s.next += w.data.byteLength;
    s.sent.push(w.id);
    s.port.postMessage({ seq: w.id, data: w.data }, [w.data]);
  }
  if (s.closing !== null && s.sent.length === 0 && s.held.size === 0) {
    if (s.next !== s.size) {
      fail(name, `the download ended at ${s.next} of ${s.size} bytes`);
      return;
    }
    // The close is answered when the service worker confirms (or fails) the download.
    s.ended = true;
    s.port.postMessage({ end: true });
  }
}

function fail(name, error) {
  const s = streams.get(name);
  if (!s || s.failed) return;
  s.failed = error;
  for (const id of s.sent) reply(id, false, error);
  for (const w of s.held.values()) reply(w.id, false, error, w.data);
  s.sent = [];
  s.held.clear();
  if (s.closing !== null) reply(s.closing, false, error);
  s.closing = null;
}

function onServiceWorker(name, port, ev) {
  const m = ev.data || {};
  const s = streams.get(name);
  if (!s || s.port !== port) return;
  if (m.ack !== undefined) {
    const at = s.sent.indexOf(m.ack);
    if (at >= 0) s.sent.splice(at, 1);
    reply(m.ack, true);
    pump(name);
  } else if (m.handedOver) {
    if (s.closing === null) return;
    streams.delete(name);
    reply(s.closing, true);
  } else if (m.failed !== undefined) {
    fail(name, "the browser did not save the download: " + m.failed);
  } else if (m.cancelled !== undefined) {
    fail(name, "the browser's download was cancelled: " + m.cancelled);
  }
}

// Returns true when the request is answered later (by pump or fail).
function runStream(msg) {
  switch (msg.op) {
    case "begin": {
      const old = streams.get(msg.name);
      if (old && !old.failed) return false; // already streaming
      streams.set(msg.name, { size: msg.size, next: 0, port: null, held: new Map(), sent: [], closing: null, ended: false, failed: null });
      self.postMessage({ stream: msg.name, path: msg.path, size: msg.size });
      return false;
    }
    case "port": {
      const s = streams.get(msg.name);
      if (!s) {
        msg.port.postMessage({ abort: "no longer wanted" });
        return true;
      }
      s.port = msg.port;
      s.port.onmessage = (ev) => onServiceWorker(msg.name, msg.port, ev);
      pump(msg.name);
      return true; // "port" has no answer
    }
    case "writes": {
      // Each chunk goes to the service worker in a buffer of its own.
      let at = 0;
      for (let i = 0; i < msg.ids.length; i++) {
        const one = { op: "write", id: msg.ids[i], name: msg.names[i], offset: msg.offsets[i], data: msg.data.slice(at, at + msg.lens[i]) };
        at += msg.lens[i];
        try {
          if (!runStream(one)) reply(one.id, true);
        } catch (e) {
          reply(one.id, false, String((e && e.message) || e));
        }
      }
      self.postMessage({ ids: [], ok: true, data: msg.data }, [msg.data]);
      return true;
    }
    case "write": {
      const s = streams.get(msg.name);
      if (!s) throw new Error("the download was not started");
      if (s.failed) throw new Error(s.failed);
      if (msg.offset < s.next || s.held.has(msg.offset)) return false; // already have it
      s.held.set(msg.offset, { id: msg.id, data: msg.data });
      pump(msg.name);
      return true;
    }
    case "close": {
      const s = streams.get(msg.name);
      if (!s) return false; // nothing was begun: nothing to close
      if (s.failed) throw new Error(s.failed);
      s.closing = msg.id;
      pump(msg.name);
      return true;
    }
    case "delete": {
      const s = streams.get(msg.name);
      if (s) {
        fail(msg.name, "the download was removed");
        if (s.port) s.port.postMessage({ abort: "the transfer was cancelled" });
        streams.delete(msg.name);
      }
      return false;
    }
    default:
      throw new Error("unknown op " + msg.op);
  }
}

// ---- requests

const store = chooseStore();
// Requests run one at a time, in order, after the hello.
let chain = store.then((s) => self.postMessage({ hello: true, store: s }));

self.onmessage = (ev) => {
  const msg = ev.data;
  // A batch of writes is answered with its ids, anything else with its id.
  const who = Array.isArray(msg.ids) ? { ids: msg.ids } : { id: msg.id };
  chain = chain.then(async () => {
    const mode = await store;
    // The batch's buffer goes back to the page for reuse, so a download does not leave a
    // trail of garbage buffers behind it.
    const back = msg.data instanceof ArrayBuffer ? [msg.data] : [];
    try {
      if (mode === "stream") {
        if (!runStream(msg)) self.postMessage({ ...who, ok: true, data: msg.data }, back);
        return;
      }
      await runOpfs(msg);
      self.postMessage({ ...who, ok: true, data: msg.data }, back);
    } catch (e) {
      const diskFull = e && e.name === "QuotaExceededError";
      const error = String((e && e.message) || e);
      self.postMessage({ ...who, ok: false, error, disk_full: diskFull, data: msg.data }, back);
    }
  });
};
