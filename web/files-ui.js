// Weft web app: file transfer and the toasts/notifications that go with it. Presentation
// only, on top of the session's files API (see "## Files" in wasm/src/lib.rs): the core
// owns offers, downloads and uploads; this module shows them and forwards the user's
// choices. app.js loads this module with the first join (the join screen needs none of
// it), creates one FilesUI and feeds it every session event.

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("aria") || k === "role") node.setAttribute(k.replace(/^aria/, "aria-").toLowerCase(), v);
    else node[k] = v;
  }
  node.append(...children.filter((c) => c != null));
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function setHidden(node, hidden) {
  if (node.hidden !== hidden) node.hidden = hidden;
}

/// Reuses `container`'s children by `data-key` so that focus, <details> state and running
/// CSS stay put across renders; creates, updates, orders and removes them.
function reconcile(container, items, keyOf, create, update) {
  const existing = new Map();
  for (const child of container.children) if (child.dataset.key) existing.set(child.dataset.key, child);
  const keep = new Set();
  let prev = null;
  for (const item of items) {
    const key = keyOf(item);
    keep.add(key);
    let node = existing.get(key);
    if (!node) {
      node = create(item);
      node.dataset.key = key;
    }
    update(node, item);
    const want = prev ? prev.nextSibling : container.firstChild;
    if (node !== want) container.insertBefore(node, want);
    prev = node;
  }
  for (const [key, node] of existing) if (!keep.has(key)) node.remove();
}

// ---- formatting ----------------------------------------------------------------------

export function formatBytes(n) {
  n = Number(n) || 0;
  if (n < 1000) return `${n} B`;
  const units = ["kB", "MB", "GB", "TB"];
  let i = -1;
  do { n /= 1000; i++; } while (n >= 1000 && i < units.length - 1);
  return `${n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2)} ${units[i]}`;
}

function formatSpeed(bps) {
  if (!(bps > 0)) return "";
  return `${(bps / 1e6).toFixed(bps >= 1e7 ? 0 : bps >= 1e6 ? 1 : 2)} MB/s`;
}

function formatEta(s) {
  if (!(s >= 0) || !Number.isFinite(s)) return "";
  s = Math.ceil(s);
  if (s < 60) return `${s} s left`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s left`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min left`;
}

function percent(done, total) {
  if (!(total > 0)) return done > 0 ? 100 : 0;
  return Math.min(100, Math.floor((done / total) * 100));
}

function plural(n, one, many = `${one}s`) {
  return `${n} ${n === 1 ? one : many}`;
}

const num = (v) => Number(v) || 0;
const sourceCount = (s) => (Array.isArray(s) ? s.length : num(s));
const sourceIds = (s) => (Array.isArray(s) ? s : []);
const offerKey = (peerId, offerId) => `${peerId}:${String(offerId)}`;
const baseName = (path) => String(path ?? "").split("/").filter(Boolean).pop() ?? String(path ?? "");

// What "Open" may show in a tab. A received file is untrusted; anything that could run
// script in our origin (HTML, SVG, XML…) opens as plain text, and types the browser cannot
// show are only saved.
const INLINE_TYPES = {
  png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp",
  avif: "image/avif", bmp: "image/bmp",
  mp4: "video/mp4", m4v: "video/mp4", webm: "video/webm", ogv: "video/ogg", mov: "video/mp4",
  mp3: "audio/mpeg", m4a: "audio/mp4", wav: "audio/wav", flac: "audio/flac", ogg: "audio/ogg", opus: "audio/ogg",
  pdf: "application/pdf",
};
const TEXT_EXTENSIONS = new Set(("txt md markdown csv tsv log json jsonl yaml yml toml ini cfg conf xml html htm svg " +
  "js mjs ts css rs py c h cc cpp hpp go java kt rb php sh bash zsh sql diff patch tex srt vtt").split(" "));

function previewType(path) {
  const ext = String(path).toLowerCase().split(".").pop();
  if (INLINE_TYPES[ext]) return INLINE_TYPES[ext];
  if (TEXT_EXTENSIONS.has(ext)) return "text/plain;charset=utf-8";
  return null;
}

// ---- dropped files and folders ------------------------------------------------------

/// The files of a drop, folders walked, as `{ file, path }` with paths relative to what was
/// dropped (e.g. "photos/2024/a.jpg"). Must be called synchronously in the drop handler:
/// the DataTransfer's items stop working once the event returns.
export function collectDrop(dataTransfer) {
  const pending = [];
  const items = [...(dataTransfer.items ?? [])].filter((i) => i.kind === "file");
  if (items.length) {
    for (const item of items) {
      const entry = typeof item.webkitGetAsEntry === "function" ? item.webkitGetAsEntry() : null;
      if (entry) pending.push({ entry });
      else {
        const file = item.getAsFile();
        if (file) pending.push({ file });
      }
    }
  } else {
    for (const file of dataTransfer.files ?? []) pending.push({ file });
  }
  return (async () => {
    const out = [];
    const problems = [];
    for (const p of pending) {
      if (p.file) out.push({ file: p.file, path: p.file.name });
      else await walkEntry(p.entry, out, problems);
    }
    return { entries: out, problems };
  })();
}

async function walkEntry(entry, out, problems) {
  const path = entry.fullPath ? entry.fullPath.replace(/^\/+/, "") : entry.name;
  try {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      out.push({ file, path: path || file.name });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      // readEntries returns the directory in batches (100 in Chromium) until an empty one.
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walkEntry(child, out, problems);
      }
    }
  } catch (e) {
    problems.push(`${path}: ${e?.message ?? e}`);
  }
}

// ---- toasts and system notifications -------------------------------------------------

const taggedToasts = new Map(); // tag -> toast node, to take back a toast that no longer applies

export function dismissToast(tag) {
  taggedToasts.get(tag)?.remove();
  taggedToasts.delete(tag);
}

export function toast(text, { kind = "info", actions = [], timeout, tag } = {}) {
  const box = $("toasts");
  if (!box) return null;
  if (tag) dismissToast(tag);
  const node = el("div", { className: `toast toast-${kind}` });
  if (tag) taggedToasts.set(tag, node);
  if (kind === "error" || kind === "warn") node.setAttribute("role", "alert");
  node.append(el("span", { className: "toast-text", textContent: text }));
  const row = el("div", { className: "toast-actions" });
  const close = () => node.remove();
  for (const a of actions) {
    const b = el("button", { type: "button", className: "small", textContent: a.label });
    b.addEventListener("click", () => { close(); a.onClick(); });
    row.append(b);
  }
  const x = el("button", { type: "button", className: "small ghost", textContent: "×", title: "Dismiss" });
  x.setAttribute("aria-label", "Dismiss notification");
  x.addEventListener("click", close);
  row.append(x);
  node.append(row);
  box.append(node);
  while (box.children.length > 5) box.firstElementChild.remove();
  const ms = timeout ?? (kind === "error" ? 12000 : actions.length ? 15000 : kind === "info" ? 5000 : 7000);
  let timer = setTimeout(close, ms);
  // Hovering or focusing a toast keeps it until the pointer or focus leaves.
  const hold = () => clearTimeout(timer);
  const release = () => { clearTimeout(timer); timer = setTimeout(close, 4000); };
  node.addEventListener("mouseenter", hold);
  node.addEventListener("focusin", hold);
  node.addEventListener("mouseleave", release);
  node.addEventListener("focusout", release);
  return node;
}

function systemNotify(title, body, tag) {
  if (!document.hidden || !("Notification" in window) || Notification.permission !== "granted") return;
  try {
    const n = new Notification(title, { body, tag });
    n.addEventListener("click", () => { window.focus(); n.close(); });
  } catch { /* some platforms only allow notifications from a service worker */ }
}

/// Toast, plus a system notification when the page is hidden.
function announce(text, opts = {}, body) {
  toast(body ? `${text} ${body}` : text, opts);
  systemNotify(text, body ?? "", opts.tag);
}

let askedNotify = false;
/// Asks for notification permission; only from a click (browsers refuse otherwise).
function askNotifyPermission() {
  if (askedNotify || !("Notification" in window) || Notification.permission !== "default") return;
  askedNotify = true;
  try { Notification.requestPermission().catch(() => {}); } catch { /* old callback form */ }
}

// ---- the files UI --------------------------------------------------------------------

export class FilesUI {
  constructor({ peers, trustBadge }) {
    this.peersMap = peers; // app.js's Map peerId -> peer object
    this.trustBadge = trustBadge; // app.js's badge of a sender's trust, as beside messages
    this.session = null;
    this.reset();
    this.renderTimer = null;
    this.pollTimer = null;
    this.bindStatic();
  }

  reset() {
    this.names = new Map(); // peerId -> display name, kept after a peer leaves
    this.offers = new Map(); // key -> pending incoming offer { peerId, offerId, name, items, totalSize }
    // Accepted incoming offers, by offer key. Offers of the same files from several peers
    // (a multi-source download) share one batch: { key, peerId, offers: [{ peerId, offerId,
    // cancelled }], items, roots, state, reason, byPeer, resumed }.
    this.batches = new Map();
    this.downloads = new Map(); // key -> latest download progress
    this.outgoing = new Map(); // key -> our offer { peerId, offerId, items, state, sentBytes, totalBytes, files, samples }
    this.serving = new Map(); // `${peerId}:${key}` -> { peerId, key, sentBytes, size, at } (as a source, not in our offer)
    this.rejected = new Map(); // key -> chunks that failed verification
    this.notes = new Map(); // key -> source note ("Alice left — waiting for another source")
    this.completedAt = new Map(); // key -> ms
    this.inDownloads = new Set(); // roots the browser saved into its downloads folder (no OPFS)
    this.hashJobs = new Set(); // { id, totalBytes, sizes: Map(path -> size), count, skipped: [text] }
    this.jobSeq = 0;
    this.hashed = new Map(); // path -> doneBytes
    this.hashingPath = "";
    this.reading = null; // "Reading the folder… 120 files" while walking a drop
    this.dismissed = new Set(); // keys of finished transfers the user dismissed
    this.lastCore = null;
    this.objectUrls = new Map(); // key -> object URL for Open
    this.recipientMode = "all";
    this.chosen = new Set();
  }

  get supported() {
    return !!this.session && typeof this.session.sendFiles === "function";
  }

  // -- wiring --

  bindStatic() {
    $("pick-files").addEventListener("click", () => $("file-input").click());
    $("pick-folder").addEventListener("click", () => $("folder-input").click());
    for (const id of ["file-input", "folder-input"]) {
      $(id).addEventListener("change", (ev) => {
        const input = ev.target;
        const entries = [...input.files].map((file) => ({ file, path: file.webkitRelativePath || file.name }));
        input.value = "";
        if (entries.length) this.send(entries).catch(() => {});
      });
    }
    for (const radio of document.querySelectorAll('input[name="send-to"]')) {
      radio.addEventListener("change", () => {
        if (radio.checked) this.recipientMode = radio.value;
        this.renderRecipients();
      });
    }
    $("save-all").hidden = typeof window.showDirectoryPicker !== "function";
    $("save-all").addEventListener("click", () => this.saveAll());

    // Drag and drop anywhere on the page. Files dropped outside the room are refused
    // (without preventDefault the browser would navigate away to the file).
    let depth = 0;
    const isFiles = (ev) => [...(ev.dataTransfer?.types ?? [])].includes("Files");
    const canDrop = () => this.supported && !$("room-panel").hidden;
    const overlay = $("drop-overlay");
    document.addEventListener("dragenter", (ev) => {
      if (!isFiles(ev)) return;
      ev.preventDefault();
      depth++;
      if (canDrop()) {
        setText($("drop-target"), this.recipientLabel());
        overlay.hidden = false;
      }
    });
    document.addEventListener("dragover", (ev) => {
      if (!isFiles(ev)) return;
      ev.preventDefault();
      ev.dataTransfer.dropEffect = canDrop() ? "copy" : "none";
    });
    document.addEventListener("dragleave", (ev) => {
      if (!isFiles(ev)) return;
      depth = Math.max(0, depth - 1);
      if (depth === 0) overlay.hidden = true;
    });
    document.addEventListener("drop", (ev) => {
      if (!isFiles(ev)) return;
      ev.preventDefault();
      depth = 0;
      overlay.hidden = true;
      if (!canDrop()) return;
      const collecting = collectDrop(ev.dataTransfer);
      this.reading = "Reading what you dropped…";
      this.render();
      collecting.then(({ entries, problems }) => {
        this.reading = null;
        if (problems.length) {
          toast(`${plural(problems.length, "item")} could not be read and ${problems.length === 1 ? "was" : "were"} skipped (${problems[0]}${problems.length > 1 ? ", …" : ""}).`, { kind: "warn" });
        }
        if (!entries.length) {
          this.showSendError("Nothing to send: what you dropped holds no files.");
          this.render();
          return;
        }
        this.send(entries).catch(() => {});
      });
    });
  }

  attach(session) {
    this.detach();
    this.session = session;
    $("send-unsupported").hidden = this.supported;
    $("send-controls").hidden = !this.supported;
    this.refresh();
    this.pollTimer = setInterval(() => this.refresh(), 1000);
    this.render();
  }

  detach() {
    clearInterval(this.pollTimer);
    this.pollTimer = null;
    for (const url of this.objectUrls.values()) URL.revokeObjectURL(url);
    const { recipientMode, chosen } = this;
    this.reset();
    this.recipientMode = recipientMode;
    this.chosen = chosen;
    this.session = null;
    this.render();
  }

  name(peerId) {
    const p = this.peersMap.get(peerId);
    if (p?.name) this.names.set(peerId, p.name);
    return this.names.get(peerId) ?? `peer ${String(peerId).slice(0, 6)}`;
  }

  peersChanged() {
    for (const p of this.peersMap.values()) if (p.name) this.names.set(p.peerId, p.name);
    this.renderRecipients();
    this.scheduleRender();
  }

  /// Pulls the core's view (the truth) and merges in what only events carry.
  refresh() {
    const s = this.session;
    if (!s || typeof s.transfers !== "function") return;
    let t;
    try { t = s.transfers(); } catch (e) { console.warn("weft: transfers() failed", e); return; }
    if (t && typeof t.then === "function") { t.then((v) => this.merge(v), () => {}); return; }
    this.merge(t);
  }

  merge(t) {
    if (!t) return;
    this.lastCore = t;
    const now = Date.now();
    const seen = new Set();
    for (const d of t.downloads ?? []) {
      seen.add(d.key);
      const old = this.downloads.get(d.key) ?? {};
      this.downloads.set(d.key, { ...old, ...d });
      if (d.state === "complete" && !this.completedAt.has(d.key)) this.completedAt.set(d.key, now);
    }
    for (const root of this.downloads.keys()) if (!seen.has(root)) this.downloads.delete(root);
    if (Array.isArray(t.incoming)) {
      const pending = new Set();
      for (const o of t.incoming) {
        const key = offerKey(o.peerId, o.offerId);
        pending.add(key);
        if (!this.offers.has(key) && !this.batches.has(key)) {
          const items = o.items ?? [];
          this.offers.set(key, {
            peerId: o.peerId, offerId: o.offerId, name: this.name(o.peerId), items,
            totalSize: items.reduce((a, i) => a + num(i.size), 0),
            trust: o.trust, looksLike: o.looksLike,
          });
        }
      }
      for (const key of this.offers.keys()) if (!pending.has(key)) this.offers.delete(key);
    }
    for (const o of t.outgoing ?? []) {
      const key = offerKey(o.peerId, o.offerId);
      const out = this.outgoingFor(o.peerId, o.offerId);
      Object.assign(out, { items: o.items ?? out.items, state: o.state, totalBytes: num(o.totalBytes) });
      this.sample(out, num(o.sentBytes), now);
      this.outgoing.set(key, out);
    }
    this.scheduleRender();
  }

  outgoingFor(peerId, offerId) {
    const key = offerKey(peerId, offerId);
    let out = this.outgoing.get(key);
    if (!out) {
      out = { key, peerId, offerId, items: [], state: "pending", sentBytes: 0, totalBytes: 0, files: new Map(), samples: [], reason: null, byPeer: false };
      this.outgoing.set(key, out);
    }
    return out;
  }

  /// Records sent bytes for a speed over the last few seconds.
  sample(out, sentBytes, now) {
    out.sentBytes = Math.max(out.sentBytes, sentBytes);
    out.samples.push([now, out.sentBytes]);
    while (out.samples.length > 2 && now - out.samples[0][0] > 4000) out.samples.shift();
  }

  uploadSpeed(out) {
    const s = out.samples;
    if (s.length < 2) return 0;
    const [t0, b0] = s[0];
    const [t1, b1] = s[s.length - 1];
    return t1 > t0 ? ((b1 - b0) * 1000) / (t1 - t0) : 0;
  }

  // -- events --

  onEvent(ev) {
    switch (ev.type) {
      case "hashing":
        this.hashed.set(ev.path, num(ev.doneBytes));
        this.hashingPath = ev.path;
        this.scheduleRender();
        break;
      case "skipped": {
        // Left out of a folder being sent (hidden files such as .git or .DS_Store, device
        // names): the rest goes; one toast says what was left out.
        for (const job of this.hashJobs) {
          if (!job.sizes.has(ev.path)) continue;
          job.totalBytes -= job.sizes.get(ev.path);
          job.sizes.delete(ev.path);
          job.count -= 1;
          job.skipped.push(`${ev.path} (${ev.reason})`);
          const n = job.skipped.length;
          toast(`Left out ${plural(n, "item")} that cannot be sent: ${job.skipped.slice(0, 3).join(", ")}${n > 3 ? ", …" : ""}.`, { kind: "warn", tag: `skipped-${job.id}` });
        }
        this.scheduleRender();
        break;
      }
      case "offer": {
        const key = offerKey(ev.peerId, ev.offerId);
        if (ev.name) this.names.set(ev.peerId, ev.name);
        const items = ev.items ?? [];
        const totalSize = ev.totalSize ?? items.reduce((a, i) => a + num(i.size), 0);
        this.offers.set(key, { peerId: ev.peerId, offerId: ev.offerId, name: this.name(ev.peerId), items, totalSize, trust: ev.trust, looksLike: ev.looksLike });
        const what = items.length === 1 ? `“${baseName(items[0].path)}”` : plural(items.length, "file");
        const text = `${this.name(ev.peerId)} offers ${what} (${formatBytes(totalSize)}).`;
        toast(text, { actions: [{ label: "Show", onClick: () => this.focusOffer(key) }], tag: key, timeout: 30000 });
        systemNotify(`${this.name(ev.peerId)} offers ${what}`, `${formatBytes(totalSize)} — open Weft to accept or decline.`, key);
        this.render();
        break;
      }
      case "offer_answered": {
        const out = this.outgoingFor(ev.peerId, ev.offerId);
        out.state = ev.accepted ? "accepted" : "declined";
        const n = out.items.length;
        const what = n === 1 ? `“${baseName(out.items[0].path)}”` : n ? `your ${plural(n, "file")}` : "your files";
        announce(ev.accepted ? `${this.name(ev.peerId)} accepted ${what}.` : `${this.name(ev.peerId)} declined ${what}.`,
          { kind: ev.accepted ? "ok" : "warn" });
        this.refresh();
        break;
      }
      case "resumed": {
        const key = offerKey(ev.peerId, ev.offerId);
        this.offers.delete(key);
        if (!this.batches.has(key)) {
          this.batches.set(key, { key, peerId: ev.peerId, offers: [{ peerId: ev.peerId, offerId: ev.offerId }], items: [], roots: [], state: "active", resumed: true });
        }
        this.dismissed.delete("resumed");
        toast(`Resumed the download from ${this.name(ev.peerId)} where it stopped.`, { kind: "ok" });
        this.refresh();
        break;
      }
      case "progress": {
        const old = this.downloads.get(ev.key) ?? {};
        const { type: _type, ...progress } = ev;
        this.downloads.set(ev.key, { ...old, ...progress });
        if (sourceCount(ev.sources) > 0 && this.notes.get(ev.key)?.waiting) this.notes.delete(ev.key);
        this.scheduleRender();
        break;
      }
      case "upload": {
        const now = Date.now();
        const out = this.findOutgoing(ev.peerId, ev.key);
        if (out) {
          out.files.set(ev.key, { ...(out.files.get(ev.key) ?? {}), sentBytes: num(ev.sentBytes), size: num(ev.size) });
          const total = [...out.files.values()].reduce((a, f) => a + Math.min(f.sentBytes, f.size), 0);
          if (total > out.sentBytes) this.sample(out, total, now);
        } else {
          this.serving.set(`${ev.peerId}:${ev.key}`, { peerId: ev.peerId, key: ev.key, sentBytes: num(ev.sentBytes), size: num(ev.size), at: now });
        }
        this.scheduleRender();
        break;
      }
      case "file_complete": {
        const old = this.downloads.get(ev.key) ?? {};
        this.downloads.set(ev.key, { ...old, key: ev.key, paths: ev.paths ?? old.paths, size: ev.size, doneBytes: ev.size, state: "complete", speedBps: 0, etaS: 0 });
        this.completedAt.set(ev.key, Date.now());
        this.notes.delete(ev.key);
        if (ev.stored === "downloads") this.inDownloads.add(ev.key);
        const where = ev.stored === "downloads" ? " It is in your browser's downloads folder." : "";
        const batches = this.batchesWith(ev.key);
        if (!batches.length) {
          announce(`Received “${baseName(ev.paths?.[0] ?? ev.key)}” (${formatBytes(ev.size)}).${where}`, { kind: "ok" });
        }
        for (const b of batches) {
          if (!b.toastedDone && b.roots.every((r) => this.downloads.get(r)?.state === "complete")) {
            b.toastedDone = true;
            const what = b.roots.length === 1 ? `“${baseName(ev.paths?.[0] ?? "")}”` : plural(b.roots.length, "file");
            announce(`Received ${what} from ${this.fromLabel(b)}.${where}`, { kind: "ok" });
          }
        }
        this.render();
        break;
      }
      case "file_failed": {
        const old = this.downloads.get(ev.key) ?? { key: ev.key };
        this.downloads.set(ev.key, { ...old, state: "failed", reason: ev.reason, speedBps: 0 });
        announce(`Could not receive “${baseName(old.paths?.[0] ?? ev.key)}”:`, { kind: "error" }, `${ev.reason}.`);
        this.render();
        break;
      }
      case "delivered": {
        const out = this.findOutgoing(ev.peerId, ev.key);
        if (out) {
          const f = out.files.get(ev.key) ?? {};
          const item = out.items.find((i) => i.key === ev.key);
          out.files.set(ev.key, { ...f, size: f.size ?? num(item?.size), sentBytes: f.size ?? num(item?.size), delivered: true });
          const roots = out.items.map((i) => i.key).filter(Boolean);
          if (!out.toastedDone && roots.length && roots.every((r) => out.files.get(r)?.delivered)) {
            out.toastedDone = true;
            const what = roots.length === 1 ? `“${baseName(out.items[0].path)}”` : `your ${plural(roots.length, "file")}`;
            announce(`${this.name(ev.peerId)} received ${what}.`, { kind: "ok" });
          }
        }
        this.refresh();
        this.render();
        break;
      }
      case "transfer_cancelled": {
        const key = offerKey(ev.peerId, ev.offerId);
        const who = this.name(ev.peerId);
        const reason = ev.reason ? ` (${ev.reason})` : "";
        let text = ev.byPeer ? `${who} cancelled the transfer${reason}.` : `Transfer cancelled${reason}.`;
        if (this.offers.has(key)) {
          this.offers.delete(key);
          dismissToast(key);
          if (ev.byPeer) text = `${who} withdrew the offer${reason}.`;
        }
        const batch = this.batches.get(key);
        if (batch) {
          const offer = batch.offers.find((o) => offerKey(o.peerId, o.offerId) === key);
          if (offer) offer.cancelled = true;
          const left = batch.offers.filter((o) => !o.cancelled);
          if (!left.length) Object.assign(batch, { state: "cancelled", reason: ev.reason, byPeer: ev.byPeer, peerId: ev.peerId });
          const rest = left.length ? `; still fetching from ${[...new Set(left.map((o) => this.name(o.peerId)))].join(", ")}` : "";
          text = ev.byPeer ? `${who} cancelled sending you files${reason}${rest}.` : `You cancelled the download from ${who}${rest}.`;
        }
        const out = this.outgoing.get(key);
        if (out) {
          Object.assign(out, { state: "cancelled", reason: ev.reason, byPeer: ev.byPeer });
          text = ev.byPeer ? `${who} cancelled receiving your files${reason}.` : `You cancelled sending to ${who}.`;
        }
        if (ev.byPeer) announce(text, { kind: "warn" });
        else toast(text);
        this.refresh();
        this.render();
        break;
      }
      case "chunk_rejected":
        this.rejected.set(ev.key, (this.rejected.get(ev.key) ?? 0) + 1);
        this.scheduleRender();
        break;
      case "source_added":
        if (this.notes.get(ev.key)?.waiting) this.notes.delete(ev.key);
        this.scheduleRender();
        break;
      case "source_dropped": {
        const d = this.downloads.get(ev.key);
        const others = sourceIds(d?.sources).filter((p) => p !== ev.peerId).length;
        const who = this.name(ev.peerId);
        const text = others > 0
          ? `${who} stopped sending${ev.reason ? ` (${ev.reason})` : ""} — continuing with ${plural(others, "other source")}.`
          : `${who} left — waiting for another source.`;
        this.notes.set(ev.key, { text, waiting: others === 0, peerId: ev.peerId, at: Date.now() });
        this.scheduleRender();
        break;
      }
      case "peer_left":
        this.scheduleRender();
        break;
    }
  }

  uniqueBatches() {
    return [...new Set(this.batches.values())];
  }

  batchesWith(root) {
    return this.uniqueBatches().filter((b) => b.roots.includes(root));
  }

  fromLabel(b) {
    const peers = [...new Set((b.offers ?? []).filter((o) => !o.cancelled).map((o) => o.peerId))];
    return (peers.length ? peers : [b.peerId]).map((p) => this.name(p)).join(", ");
  }

  findOutgoing(peerId, root) {
    let fallback = null;
    for (const out of this.outgoing.values()) {
      if (out.peerId !== peerId) continue;
      if (out.items.some((i) => i.key === root)) {
        if (out.state === "accepted" || out.state === "pending") return out;
        fallback = out;
      }
    }
    return fallback;
  }

  // -- actions --

  recipients() {
    const connected = [...this.peersMap.values()].filter((p) => p.state === "direct" || p.state === "relayed");
    if (this.recipientMode === "all") return { to: undefined, list: connected };
    const list = connected.filter((p) => this.chosen.has(p.peerId));
    return { to: list.map((p) => p.peerId), list };
  }

  recipientLabel() {
    const { list } = this.recipients();
    if (!list.length) return this.recipientMode === "all" ? "no one (no peer is connected)" : "no one (choose peers under “Send to”)";
    if (this.recipientMode === "all") return `everyone connected (${list.length})`;
    return list.map((p) => this.name(p.peerId)).join(", ");
  }

  showSendError(message) {
    const node = $("send-error");
    node.textContent = message ?? "";
    node.hidden = !message;
  }

  /// Hashes and offers `entries` ({ file, path }) to the chosen recipients.
  async send(entries, to) {
    const session = this.session;
    if (!session || !this.supported) throw new Error("not joined");
    let target = to;
    if (to === undefined) {
      const r = this.recipients();
      if (!r.list.length) {
        const msg = this.recipientMode === "all"
          ? "No one is connected yet: nothing was sent."
          : "Choose at least one connected peer under “Send to”.";
        this.showSendError(msg);
        toast(msg, { kind: "warn" });
        throw new Error(msg);
      }
      target = r.to;
    }
    this.showSendError("");
    const sizes = new Map(entries.map((e) => [e.path ?? e.file?.webkitRelativePath ?? e.file?.name ?? e.name, num(e.file?.size ?? e.size)]));
    const job = { id: ++this.jobSeq, sizes, totalBytes: [...sizes.values()].reduce((a, b) => a + b, 0), count: entries.length, skipped: [] };
    for (const path of sizes.keys()) this.hashed.delete(path);
    this.hashJobs.add(job);
    this.render();
    try {
      const result = await session.sendFiles(entries, target);
      for (const { peerId, offerId } of result ?? []) this.outgoingFor(peerId, offerId);
      const names = (result ?? []).map((r) => this.name(r.peerId));
      const sent = entries.filter((e) => job.sizes.has(e.path ?? e.file?.webkitRelativePath ?? e.file?.name ?? e.name));
      const what = sent.length === 1 ? `“${baseName(sent[0].path ?? sent[0].file?.name ?? "")}”` : plural(sent.length, "file");
      if (names.length) toast(`Offered ${what} to ${names.join(", ")}. Waiting for ${names.length === 1 ? "an answer" : "answers"}.`, { kind: "info" });
      this.refresh();
      return result;
    } catch (e) {
      const msg = `Could not send: ${e?.message ?? e}`;
      this.showSendError(msg);
      toast(msg, { kind: "error" });
      throw e;
    } finally {
      this.hashJobs.delete(job);
      for (const path of sizes.keys()) this.hashed.delete(path);
      this.render();
    }
  }

  accept(offer) {
    askNotifyPermission();
    const key = offerKey(offer.peerId, offer.offerId);
    try {
      this.session.acceptOffer(offer.peerId, offer.offerId);
    } catch (e) {
      this.offers.delete(key);
      toast(`Could not accept: ${e?.message ?? e}`, { kind: "error" });
      this.render();
      return;
    }
    this.offers.delete(key);
    dismissToast(key);
    const roots = [...new Set(offer.items.map((i) => i.key))];
    const entry = { peerId: offer.peerId, offerId: offer.offerId };
    // The same files offered by someone else too: one download with several sources.
    const same = this.uniqueBatches().find((b) => !b.resumed && b.state === "active" && b.roots.some((r) => roots.includes(r)));
    if (same) {
      same.offers.push(entry);
      for (const item of offer.items) {
        if (!same.roots.includes(item.key)) { same.roots.push(item.key); same.items.push(item); }
      }
      this.batches.set(key, same);
    } else {
      this.batches.set(key, { key, peerId: offer.peerId, offers: [entry], items: [...offer.items], roots, state: "active" });
    }
    this.refresh();
    this.render();
  }

  decline(offer) {
    const key = offerKey(offer.peerId, offer.offerId);
    dismissToast(key);
    try { this.session.declineOffer(offer.peerId, offer.offerId); } catch (e) { toast(`Could not decline: ${e?.message ?? e}`, { kind: "error" }); }
    this.offers.delete(key);
    this.render();
  }

  cancel(peerId, offerId) {
    try {
      this.session.cancelTransfer(peerId, offerId);
    } catch (e) {
      toast(`Could not cancel: ${e?.message ?? e}`, { kind: "error" });
    }
    this.refresh();
    this.render();
  }

  pause(roots, paused) {
    for (const root of roots) {
      try { this.session.pauseDownload(root, paused); } catch (e) { toast(`Could not ${paused ? "pause" : "resume"}: ${e?.message ?? e}`, { kind: "error" }); break; }
      const d = this.downloads.get(root);
      if (d && d.state !== "complete" && d.state !== "failed") d.state = paused ? "paused" : "active";
    }
    this.refresh();
    this.render();
  }

  async open(root, path, button) {
    // Open the tab within the click (popup blockers), then point it at the file.
    const win = window.open("", "_blank");
    if (win) win.opener = null;
    button.disabled = true;
    try {
      let url = this.objectUrls.get(root);
      if (!url) {
        const file = await this.session.downloadedFile(root);
        const type = previewType(path) ?? "application/octet-stream";
        url = URL.createObjectURL(new Blob([file], { type }));
        this.objectUrls.set(root, url);
      }
      if (win) win.location.replace(url);
      else el("a", { href: url, target: "_blank", rel: "noopener" }).click();
    } catch (e) {
      win?.close();
      toast(`Could not open “${baseName(path)}”: ${e?.message ?? e}`, { kind: "error" });
    } finally {
      button.disabled = false;
    }
  }

  async save(root, path, button) {
    button.disabled = true;
    try { await this.session.saveDownload(root, path); } catch (e) { toast(`Could not save “${baseName(path)}”: ${e?.message ?? e}`, { kind: "error" }); } finally { button.disabled = false; }
  }

  async saveAll() {
    const button = $("save-all");
    button.disabled = true;
    try {
      await this.session.saveAllTo();
      toast("Saved every received file to the folder you chose.", { kind: "ok" });
    } catch (e) {
      if (e?.name !== "AbortError" && !/abort|cancel/i.test(String(e?.message ?? e))) {
        toast(`Could not save to the folder: ${e?.message ?? e}`, { kind: "error" });
      }
    } finally {
      button.disabled = false;
    }
  }

  async remove(root, path) {
    try {
      await this.session.forgetDownload(root);
      const url = this.objectUrls.get(root);
      if (url) URL.revokeObjectURL(url);
      this.objectUrls.delete(root);
      this.downloads.delete(root);
      this.completedAt.delete(root);
      if (this.inDownloads.delete(root)) toast(`Cleared “${baseName(path)}” from the list (the saved file stays).`);
      else toast(`Removed “${baseName(path)}” from this browser.`);
    } catch (e) {
      toast(`Could not remove “${baseName(path)}”: ${e?.message ?? e}`, { kind: "error" });
    }
    this.refresh();
    this.render();
  }

  focusOffer(key) {
    const node = [...$("offers").children].find((n) => n.dataset.key === key);
    if (!node) return;
    node.scrollIntoView({ block: "center", behavior: "smooth" });
    node.querySelector("button.accept")?.focus({ preventScroll: true });
  }

  // -- rendering --

  scheduleRender() {
    if (this.renderTimer) return;
    this.renderTimer = setTimeout(() => { this.renderTimer = null; this.render(); }, 200);
  }

  render() {
    if (this.renderTimer) { clearTimeout(this.renderTimer); this.renderTimer = null; }
    this.renderHashing();
    this.renderOffers();
    this.renderDownloads();
    this.renderUploads();
    this.renderReceived();
    const busy = $("offers").children.length + $("downloads").children.length + $("uploads").children.length;
    setHidden($("no-transfers"), busy > 0);
    setHidden($("transfers-card"), busy === 0);
    const pending = this.offers.size;
    const title = pending ? `(${pending}) Weft` : "Weft";
    if (document.title !== title) document.title = title;
  }

  renderRecipients() {
    const connected = [...this.peersMap.values()].filter((p) => p.state === "direct" || p.state === "relayed");
    setText($("send-to-all-count"), connected.length ? `(${connected.length})` : "");
    const ids = new Set(connected.map((p) => p.peerId));
    for (const id of [...this.chosen]) if (!this.peersMap.has(id)) this.chosen.delete(id);
    const list = [...this.peersMap.values()].filter((p) => p.state !== "failed");
    reconcile($("recipient-list"), list, (p) => p.peerId, (p) => {
      const box = el("input", { type: "checkbox", dataset: { peerId: p.peerId } });
      box.id = `to-${p.peerId.replace(/[^\w-]/g, "_")}`;
      box.addEventListener("change", () => {
        if (box.checked) this.chosen.add(p.peerId); else this.chosen.delete(p.peerId);
        if (box.checked && this.recipientMode !== "some") {
          this.recipientMode = "some";
          $("send-to-some").checked = true;
        }
        this.renderRecipients();
      });
      const label = el("label", { htmlFor: box.id, className: "inline" }, box, el("span", { className: "r-name" }), el("span", { className: "r-state hint" }));
      return el("li", {}, label);
    }, (li, p) => {
      const box = li.querySelector("input");
      box.checked = this.chosen.has(p.peerId);
      box.disabled = !ids.has(p.peerId);
      setText(li.querySelector(".r-name"), this.name(p.peerId));
      setText(li.querySelector(".r-state"), ids.has(p.peerId) ? "" : ` (${p.state ?? "connecting"}…)`);
    });
    setHidden($("no-recipients"), list.length > 0);
    $("send-to-all").checked = this.recipientMode === "all";
    $("send-to-some").checked = this.recipientMode === "some";
    $("recipient-list").classList.toggle("inactive", this.recipientMode !== "some");
    setText($("send-summary"), `Sending to ${this.recipientLabel()}.`);
  }

  renderHashing() {
    const box = $("hashing");
    if (!this.hashJobs.size && !this.reading) { setHidden(box, true); return; }
    setHidden(box, false);
    const bar = $("hashing-progress");
    if (this.reading && !this.hashJobs.size) {
      setText($("hashing-label"), this.reading);
      bar.removeAttribute("value");
      return;
    }
    let total = 0, done = 0, count = 0;
    for (const job of this.hashJobs) {
      total += job.totalBytes;
      count += job.count;
      for (const [path, size] of job.sizes) done += Math.min(size, this.hashed.get(path) ?? 0);
    }
    const current = this.hashingPath && [...this.hashJobs].some((j) => j.sizes.has(this.hashingPath)) ? ` — ${this.hashingPath}` : "";
    setText($("hashing-label"), `Preparing ${plural(count, "file")} (${formatBytes(total)}): fingerprinting ${percent(done, total)}%${current}`);
    bar.max = Math.max(1, total);
    bar.value = done;
  }

  renderOffers() {
    const offers = [...this.offers.entries()].map(([key, o]) => ({ key, ...o }));
    reconcile($("offers"), offers, (o) => o.key, (o) => {
      const items = [...(o.items ?? [])].sort((x, y) => String(x.path).localeCompare(String(y.path)));
      const li = el("li", { className: "offer transfer", dataset: { peerId: o.peerId, offerId: String(o.offerId) } });
      const what = items.length === 1 ? `“${items[0].path}”` : plural(items.length, "file");
      li.append(el("p", { className: "t-title" },
        el("strong", { textContent: o.name ?? this.name(o.peerId) }),
        " ", this.trustBadge(o),
        ` offers ${what} · ${formatBytes(o.totalSize)}`));
      if (items.length > 1) {
        const names = el("ul", { className: "names" });
        const shown = items.slice(0, 500);
        for (const i of shown) {
          const have = this.downloads.get(i.key)?.state === "complete" ? " · already received" : "";
          names.append(el("li", {}, el("span", { className: "f-name", textContent: i.path, title: i.path }), el("span", { className: "hint", textContent: formatBytes(i.size) + have })));
        }
        if (items.length > shown.length) names.append(el("li", { className: "hint", textContent: `… and ${items.length - shown.length} more` }));
        if (items.length <= 5) li.append(names);
        else li.append(el("details", {}, el("summary", { textContent: `Show the ${items.length} names` }), names));
      }
      const have = items.filter((i) => this.downloads.get(i.key)?.state === "complete").length;
      if (have) {
        li.append(el("p", { className: "hint", textContent: have === items.length
          ? (items.length === 1 ? "You already received this file." : "You already received all of these files.")
          : `You already received ${have} of these files.` }));
      }
      const accept = el("button", { type: "button", className: "accept", textContent: "Accept" });
      const decline = el("button", { type: "button", className: "decline secondary", textContent: "Decline" });
      accept.setAttribute("aria-label", `Accept ${what} from ${o.name ?? this.name(o.peerId)}`);
      decline.setAttribute("aria-label", `Decline ${what} from ${o.name ?? this.name(o.peerId)}`);
      accept.addEventListener("click", () => this.accept(o));
      decline.addEventListener("click", () => this.decline(o));
      li.append(el("div", { className: "row actions" }, accept, decline));
      return li;
    }, () => {});
  }

  /// The accepted offers (and resumed downloads) with their files' progress.
  downloadGroups() {
    const groups = [];
    const placed = new Set();
    for (const b of this.uniqueBatches()) {
      if (b.resumed) continue;
      for (const r of b.roots) placed.add(r);
      groups.push(b);
    }
    // Downloads we know no offer of (restored after a reload, or resumed): one group,
    // cancellable through the offers that resumed them.
    const resumed = this.uniqueBatches().filter((b) => b.resumed);
    const loose = [...this.downloads.values()].filter((d) => !placed.has(d.key) && (d.state !== "complete" || resumed.some((b) => b.roots.includes(d.key))));
    for (const b of resumed) {
      b.roots = [...new Set([...b.roots, ...loose.filter((d) => sourceIds(d.sources).includes(b.peerId)).map((d) => d.key)])];
    }
    if (loose.length) {
      const peers = [...new Set(resumed.map((b) => b.peerId))];
      groups.push({
        key: "resumed", resumed: true, peerId: peers[0], peers, offers: resumed,
        roots: loose.map((d) => d.key), items: [], state: resumed.length && resumed.every((b) => b.state === "cancelled") ? "cancelled" : "active",
      });
    }
    return groups.filter((g) => !this.dismissed.has(g.key));
  }

  renderDownloads() {
    const groups = this.downloadGroups();
    reconcile($("downloads"), groups, (g) => g.key, () => this.transferSkeleton("download"), (li, g) => {
      const files = g.roots.map((root) => {
        const d = this.downloads.get(root) ?? {};
        const item = g.items.find((i) => i.key === root);
        return {
          key: root, path: item?.path ?? d.paths?.[0] ?? root.slice(0, 12), size: num(d.size ?? item?.size),
          done: num(d.doneBytes), state: d.state ?? (g.state === "cancelled" ? "cancelled" : "waiting"),
          speed: d.state === "active" ? num(d.speedBps) : 0, eta: d.etaS, sources: sourceCount(d.sources),
          sourceIds: sourceIds(d.sources), reason: d.reason, rejected: this.rejected.get(root) ?? 0, note: this.notes.get(root),
        };
      });
      const size = files.reduce((a, f) => a + f.size, 0);
      const done = files.reduce((a, f) => a + Math.min(f.done, f.size), 0);
      const speed = files.reduce((a, f) => a + f.speed, 0);
      const complete = files.filter((f) => f.state === "complete").length;
      const failed = files.filter((f) => f.state === "failed");
      const open = files.filter((f) => f.state !== "complete" && f.state !== "failed");
      const paused = open.length > 0 && open.every((f) => f.state === "paused");
      const sources = new Set(files.filter((f) => f.state === "active").flatMap((f) => f.sourceIds)).size
        || Math.max(0, ...files.filter((f) => f.state === "active").map((f) => f.sources));
      let state;
      if (g.state === "cancelled") state = "cancelled";
      else if (files.length && complete === files.length) state = "complete";
      else if (!open.length && failed.length) state = "failed";
      else if (paused) state = "paused";
      else state = "active";
      li.dataset.state = state;

      const from = g.key === "resumed"
        ? (g.peers.length ? `Resumed from ${g.peers.map((p) => this.name(p)).join(", ")}` : "Unfinished downloads")
        : `From ${this.fromLabel(g)}`;
      setText(li.r.title, `${from} · ${plural(files.length, "file")} · ${formatBytes(size)}`);
      const stateText = { cancelled: g.byPeer ? `Cancelled by ${this.name(g.peerId)}` : "Cancelled", complete: "✓ Done", failed: "Failed", paused: "Paused", active: "" }[state];
      setText(li.r.state, stateText);
      li.r.state.className = `t-state t-${state}`;
      li.r.bar.max = Math.max(1, size);
      li.r.bar.value = state === "complete" ? Math.max(1, size) : done;
      li.r.bar.setAttribute("aria-label", `${from}: ${percent(done, size)}%`);
      const meta = state === "cancelled" ? [] : [`${percent(done, size)}%`, `${formatBytes(done)} of ${formatBytes(size)}`];
      if (state === "active") {
        if (speed > 0) meta.push(formatSpeed(speed), formatEta((size - done) / speed));
        if (sources > 1) meta.push(`from ${sources} sources`);
        else if (sources === 0 && open.length) meta.push("waiting for a source");
      }
      if (failed.length && state !== "failed") meta.push(`${plural(failed.length, "file")} failed`);
      setText(li.r.meta, meta.join(" · "));
      setHidden(li.r.meta, !meta.length);

      const notes = [];
      if (g.reason && g.byPeer && state === "cancelled") notes.push(`Reason: ${g.reason}`);
      const dropped = files.map((f) => f.note).filter((n) => n && state === "active");
      if (dropped.length) notes.push(dropped.sort((a, b) => b.at - a.at)[0].text);
      if (state === "failed" && failed[0]?.reason) notes.push(failed[0].reason);
      const rejected = files.reduce((a, f) => a + f.rejected, 0);
      if (rejected) notes.push(`${plural(rejected, "chunk")} failed verification and ${rejected === 1 ? "was" : "were"} fetched again.`);
      setText(li.r.note, notes.join(" "));
      setHidden(li.r.note, !notes.length);

      const live = state === "active" || state === "paused";
      setHidden(li.r.pause, !live || !open.length);
      setText(li.r.pause, paused ? "Resume" : "Pause");
      li.r.pause.onclick = () => this.pause(open.map((f) => f.key), !paused);
      const cancelKeys = (g.key === "resumed" ? g.offers.flatMap((b) => b.offers) : g.offers).filter((o) => !o.cancelled);
      // Downloads restored after a reload have no offer to cancel: discard them instead.
      const discard = !cancelKeys.length && g.key === "resumed";
      setText(li.r.cancel, discard ? "Discard" : "Cancel");
      setHidden(li.r.cancel, !live || (!cancelKeys.length && !discard));
      li.r.cancel.onclick = discard
        ? () => { for (const f of open) this.remove(f.key, f.path); }
        : () => { for (const o of cancelKeys) this.cancel(o.peerId, o.offerId); };
      setHidden(li.r.dismiss, live);
      li.r.dismiss.onclick = () => { this.dismissed.add(g.key); this.render(); };

      this.renderFileRows(li, files, (row, f) => {
        const text = [];
        if (f.state === "complete") text.push("✓");
        else if (f.state === "failed") text.push(`failed: ${f.reason ?? "unknown reason"}`);
        else if (f.state === "paused") text.push(`paused · ${percent(f.done, f.size)}%`);
        else if (f.state === "cancelled") text.push("cancelled");
        else {
          text.push(`${percent(f.done, f.size)}%`);
          if (f.speed > 0) text.push(formatSpeed(f.speed));
          if (f.sources > 1) text.push(`${f.sources} sources`);
          if (f.note?.waiting) text.push(f.note.text);
        }
        if (f.rejected) text.push(`${plural(f.rejected, "chunk")} re-fetched`);
        setText(row.r.meta, text.join(" · "));
        row.r.bar.max = Math.max(1, f.size);
        row.r.bar.value = f.state === "complete" ? Math.max(1, f.size) : Math.min(f.done, f.size);
        const canPause = live && files.length > 1 && (f.state === "active" || f.state === "paused");
        const canRemove = f.state === "failed";
        setHidden(row.r.button, !canPause && !canRemove);
        const label = canRemove ? "Remove" : f.state === "paused" ? "Resume" : "Pause";
        setText(row.r.button, label);
        row.r.button.setAttribute("aria-label", `${label} ${f.path}`);
        row.r.button.onclick = canRemove ? () => this.remove(f.key, f.path) : () => this.pause([f.key], f.state !== "paused");
        row.dataset.state = f.state;
      });
    });
  }

  renderUploads() {
    const now = Date.now();
    for (const [key, s] of this.serving) if (now - s.at > 15000) this.serving.delete(key);
    const groups = [...this.outgoing.values()].filter((o) => !this.dismissed.has(o.key));
    if (this.serving.size) groups.push({ key: "serving", serving: true });
    reconcile($("uploads"), groups, (g) => g.key, () => this.transferSkeleton("upload"), (li, g) => {
      if (g.serving) return this.renderServing(li);
      const files = g.items.map((i) => {
        const f = g.files.get(i.key) ?? {};
        const size = num(i.size ?? f.size);
        return { key: i.key ?? i.path, path: i.path, size, done: f.delivered ? size : Math.min(num(f.sentBytes), size), delivered: !!f.delivered };
      });
      const total = g.totalBytes || files.reduce((a, f) => a + f.size, 0);
      const sent = Math.min(total, Math.max(g.sentBytes, files.reduce((a, f) => a + f.done, 0)));
      const allDelivered = files.length > 0 && files.every((f) => f.delivered);
      // "delivered" only once every file is: the receiver confirms them one by one.
      let state = g.state;
      if (state === "accepted" && allDelivered) state = "delivered";
      if (state === "delivered" && !allDelivered && sent < total) state = "accepted";
      li.dataset.state = state;
      const who = this.name(g.peerId);
      setText(li.r.title, `To ${who} · ${files.length ? `${plural(files.length, "file")} · ${formatBytes(total)}` : "preparing…"}`);
      const stateText = {
        pending: `Waiting for ${who} to accept`, accepted: "", declined: `${who} declined`,
        cancelled: g.byPeer ? `Cancelled by ${who}` : "Cancelled", delivered: "✓ Delivered",
      }[state] ?? state;
      setText(li.r.state, stateText);
      li.r.state.className = `t-state t-${state}`;
      li.r.bar.max = Math.max(1, total);
      li.r.bar.value = state === "delivered" ? Math.max(1, total) : sent;
      li.r.bar.setAttribute("aria-label", `Sending to ${who}: ${percent(sent, total)}%`);
      setHidden(li.r.bar, state === "pending" || state === "declined");
      const meta = [];
      if (state === "accepted") {
        meta.push(`${percent(sent, total)}%`, `${formatBytes(sent)} of ${formatBytes(total)}`);
        const speed = this.uploadSpeed(g);
        if (speed > 0) meta.push(formatSpeed(speed), formatEta((total - sent) / speed));
      }
      setText(li.r.meta, meta.join(" · "));
      setHidden(li.r.meta, !meta.length);
      const why = state === "cancelled" && g.byPeer && g.reason ? `Reason: ${g.reason}` : "";
      setText(li.r.note, why);
      setHidden(li.r.note, !why);
      setHidden(li.r.pause, true);
      const live = state === "pending" || state === "accepted";
      setHidden(li.r.cancel, !live);
      li.r.cancel.onclick = () => this.cancel(g.peerId, g.offerId);
      setHidden(li.r.dismiss, live);
      li.r.dismiss.onclick = () => { this.dismissed.add(g.key); this.render(); };
      this.renderFileRows(li, files, (row, f) => {
        setText(row.r.meta, f.delivered ? "✓ delivered" : state === "accepted" ? `${percent(f.done, f.size)}%` : "");
        row.r.bar.max = Math.max(1, f.size);
        row.r.bar.value = f.done;
        setHidden(row.r.button, true);
      });
    });
  }

  renderServing(li) {
    const rows = [...this.serving.values()];
    const pathOf = (root) => this.downloads.get(root)?.paths?.[0]
      ?? [...this.outgoing.values()].flatMap((o) => o.items).find((i) => i.key === root)?.path ?? `${root.slice(0, 12)}…`;
    setText(li.r.title, "Helping others download");
    setText(li.r.state, "");
    setText(li.r.meta, `${plural(rows.length, "file")} served as an extra source`);
    setHidden(li.r.bar, true);
    setHidden(li.r.note, true);
    for (const b of [li.r.pause, li.r.cancel, li.r.dismiss]) setHidden(b, true);
    this.renderFileRows(li, rows.map((s) => ({ key: `${s.peerId}:${s.key}`, path: `${pathOf(s.key)} → ${this.name(s.peerId)}`, size: s.size, done: Math.min(s.sentBytes, s.size) })), (row, f) => {
      setText(row.r.meta, `${percent(f.done, f.size)}%`);
      row.r.bar.max = Math.max(1, f.size);
      row.r.bar.value = f.done;
      setHidden(row.r.button, true);
    });
  }

  transferSkeleton(kind) {
    const r = {
      title: el("span", { className: "t-title" }),
      state: el("span", { className: "t-state" }),
      bar: el("progress", { className: "t-bar", max: 1, value: 0 }),
      meta: el("p", { className: "t-meta hint" }),
      note: el("p", { className: "t-note", hidden: true }),
      pause: el("button", { type: "button", className: "small secondary pause", textContent: "Pause" }),
      cancel: el("button", { type: "button", className: "small secondary cancel", textContent: "Cancel" }),
      dismiss: el("button", { type: "button", className: "small ghost dismiss", textContent: "Dismiss" }),
      files: el("ul", { className: "file-rows" }),
      more: el("p", { className: "hint more", hidden: true }),
      summary: el("summary"),
    };
    r.details = el("details", { className: "t-files" }, r.summary, r.files, r.more);
    const li = el("li", { className: `transfer ${kind}` },
      el("div", { className: "t-head" }, r.title, r.state),
      r.bar, r.meta, r.note,
      el("div", { className: "row actions" }, r.pause, r.cancel, r.dismiss),
      r.details);
    li.r = r;
    return li;
  }

  renderFileRows(li, files, update) {
    const r = li.r;
    setText(r.summary, files.length === 1 ? "1 file" : `${files.length} files`);
    if (!r.details.dataset.init && files.length) {
      r.details.dataset.init = "1";
      r.details.open = files.length <= 6;
    }
    setHidden(r.details, files.length === 0);
    // Large folders: the unfinished files first, at most 200 rows.
    const limit = 200;
    let shown = files;
    if (files.length > limit) {
      const rank = (f) => (f.state === "active" ? 0 : f.state === "failed" ? 1 : f.state === "complete" || f.delivered ? 3 : 2);
      shown = [...files].sort((a, b) => rank(a) - rank(b)).slice(0, limit);
    }
    setText(r.more, files.length > shown.length ? `… and ${files.length - shown.length} more` : "");
    setHidden(r.more, files.length <= shown.length);
    if (!r.details.open) return; // nothing to draw while collapsed
    reconcile(r.files, shown, (f) => f.key, (f) => {
      const row = el("li", { className: "file-row" });
      row.r = {
        name: el("span", { className: "f-name", textContent: f.path, title: f.path }),
        size: el("span", { className: "f-size hint", textContent: formatBytes(f.size) }),
        bar: el("progress", { max: 1, value: 0 }),
        meta: el("span", { className: "f-meta hint" }),
        button: el("button", { type: "button", className: "small ghost", hidden: true }),
      };
      row.r.bar.setAttribute("aria-label", f.path);
      row.append(row.r.name, row.r.size, row.r.bar, row.r.meta, row.r.button);
      return row;
    }, update);
    if (!r.details.dataset.toggle) {
      r.details.dataset.toggle = "1";
      r.details.addEventListener("toggle", () => this.render());
    }
  }

  renderReceived() {
    const done = [...this.downloads.values()]
      .filter((d) => d.state === "complete")
      .sort((a, b) => (this.completedAt.get(b.key) ?? 0) - (this.completedAt.get(a.key) ?? 0));
    setText($("received-count"), String(done.length));
    setHidden($("no-received"), done.length > 0);
    const kept = done.filter((d) => !this.inDownloads.has(d.key));
    setHidden($("save-all"), typeof window.showDirectoryPicker !== "function" || !kept.length || !this.session);
    reconcile($("received"), done, (d) => d.key, (d) => {
      const path = d.paths?.[0] ?? d.key;
      const li = el("li", { dataset: { key: d.key } });
      const streamed = this.inDownloads.has(d.key);
      const hints = [formatBytes(d.size), ...(d.paths?.length > 1 ? [`also as ${d.paths.slice(1).join(", ")}`] : [])];
      if (streamed) hints.push("saved in your browser's downloads folder");
      const info = el("div", { className: "r-info" },
        el("span", { className: "f-name", textContent: path, title: path }),
        el("span", { className: "hint", textContent: hints.join(" · ") }));
      const actions = el("div", { className: "row actions" });
      if (streamed) {
        // The browser saved it; this page keeps no copy to open or save again.
        const clear = el("button", { type: "button", className: "small secondary remove", textContent: "Clear" });
        clear.setAttribute("aria-label", `Clear ${path} from this list`);
        clear.addEventListener("click", () => this.remove(d.key, path));
        actions.append(clear);
        li.append(info, actions);
        return li;
      }
      if (previewType(path)) {
        const open = el("button", { type: "button", className: "small open", textContent: "Open" });
        open.setAttribute("aria-label", `Open ${path} in a new tab`);
        open.addEventListener("click", () => this.open(d.key, path, open));
        actions.append(open);
      }
      const save = el("button", { type: "button", className: "small save", textContent: "Save" });
      save.setAttribute("aria-label", `Save ${path}`);
      save.addEventListener("click", () => this.save(d.key, path, save));
      const remove = el("button", { type: "button", className: "small secondary remove", textContent: "Remove" });
      remove.setAttribute("aria-label", `Remove ${path} from this browser`);
      let armed = null;
      remove.addEventListener("click", () => {
        if (!armed) {
          remove.textContent = "Really remove?";
          armed = setTimeout(() => { armed = null; remove.textContent = "Remove"; }, 4000);
          return;
        }
        clearTimeout(armed);
        armed = null;
        this.remove(d.key, path);
      });
      actions.append(save, remove);
      li.append(info, actions);
      return li;
    }, () => {});
  }

  /// What tests and embedders read as `window.weft.transfers`.
  snapshot() {
    let core = this.lastCore;
    if (this.session && typeof this.session.transfers === "function") {
      try {
        const t = this.session.transfers();
        if (t && typeof t.then !== "function") core = t;
      } catch { /* keep the last one */ }
    }
    return {
      downloads: core?.downloads ?? [...this.downloads.values()],
      outgoing: core?.outgoing ?? [],
      incoming: core?.incoming ?? [],
      offers: [...this.offers.values()],
      received: [...this.downloads.values()].filter((d) => d.state === "complete"),
      hashing: [...this.hashJobs].map((j) => ({ files: j.count, totalBytes: j.totalBytes })),
      rejectedChunks: Object.fromEntries(this.rejected),
      notes: Object.fromEntries([...this.notes].map(([root, n]) => [root, n.text])),
    };
  }
}
