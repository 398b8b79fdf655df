// Weft web app: the page's UI on top of the WASM core's JavaScript API (see the docs at
// the top of wasm/src/lib.rs). Everything here is presentation; the protocol lives in Rust.
import init, * as weft from "./pkg/weft_wasm.js";

const $ = (id) => document.getElementById(id);
let session = null;
const peers = new Map(); // peerId -> latest peer object from the core
const passphraseFailures = new Map(); // peerId -> failed passphrase checks the core counted
const listeners = new Set(); // extra event listeners (window.weft.on), for embedders and tests
// The file-transfer UI (files-ui.js), loaded with the first join rather than with the page:
// the join screen needs none of it (page weight: 11 KB of a first visit's 330). Until it
// is there, what it is told waits in order (`withFiles`).
let files = null;
let filesLoad = null;
const filesQueue = [];
// sessionStorage key of the invite this tab joined with, so that a reload rejoins (see join).
const INVITE_KEY = "weft-invite";

function dispatch(ev) {
  onEvent(ev);
  for (const listener of listeners) {
    try { listener(ev); } catch (e) { console.error("weft listener failed", e); }
  }
}

/// Calls `call(files)` now if the file-transfer UI is loaded, once it is if it is loading;
/// before the first join there is nothing to tell it.
function withFiles(call) {
  if (files) call(files);
  else if (filesLoad) filesQueue.push(call);
}

function loadFiles() {
  filesLoad ??= import("./files-ui.js").then(({ FilesUI }) => {
    files = new FilesUI({ peers, trustBadge });
    for (const call of filesQueue.splice(0)) call(files);
    return files;
  });
  return filesLoad;
}

// Until the file-transfer UI is there, a file dropped on the page must not make the
// browser navigate away to it (files-ui.js then takes drops over).
for (const type of ["dragover", "drop"]) {
  document.addEventListener(type, (ev) => {
    if (!files && [...(ev.dataTransfer?.types ?? [])].includes("Files")) ev.preventDefault();
  });
}

function setStatus(status, detail) {
  document.body.dataset.status = status;
  $("status").textContent = status.replace("_", " ");
  $("status-detail").textContent = detail ?? "";
}

function showError(id, message) {
  const el = $(id);
  el.textContent = message ?? "";
  el.hidden = !message;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

/// The trust of a sender, shown beside each message and each offer: a verified key, a
/// known one, a first contact, a changed key, or a name that looks like another member's.
function trustBadge({ trust, looksLike, mine }) {
  if (mine) return "";
  if (looksLike) {
    return el("span", { className: "trust trust-alike", textContent: `⚠ looks like "${looksLike}", another key` });
  }
  const words = { verified: "✓ verified", known: "known key", new: "first contact", changed: "⚠ key changed" };
  const word = words[trust] ?? "unverified";
  return el("span", { className: `trust trust-${trust ?? "unknown"}`, textContent: word });
}

function renderPeers() {
  const list = $("peers");
  const items = [...peers.values()].map((p) => {
    const li = el("li");
    li.dataset.peerId = p.peerId;
    li.dataset.state = p.state;
    li.append(
      el("span", { className: "name", textContent: p.name ?? `peer ${p.peerId.slice(0, 6)}` }),
      el("span", { className: `state state-${p.state}`, textContent: p.state }),
    );
    const meta = [];
    if (p.state === "relayed") {
      meta.push(p.relayTransport ? `relay over ${p.relayTransport.toUpperCase()}` : "through the peer's relay");
    }
    if (p.shortCode) meta.push(`safety code ${p.shortCode}`);
    if (p.rttMs != null) meta.push(`${Math.round(p.rttMs)} ms`);
    if (p.ipv4) meta.push(p.ipv4);
    if (meta.length) li.append(el("span", { className: "meta", textContent: meta.join(" · ") }));
    if (p.trust === "verified") {
      li.append(el("span", { className: "meta trust-verified", textContent: "✓ verified" }));
    }
    if (p.looksLike) {
      li.append(el("span", {
        className: "warn",
        textContent: `⚠ looks like "${p.looksLike}", but has another key. It may be someone posing as them.`,
      }));
    }
    if (p.trust === "changed") {
      const warn = el("span", {
        className: "warn",
        textContent: `⚠ ${p.name}'s key changed since you last talked. It may be someone else. Compare safety codes before trusting it.`,
      });
      const accept = el("button", { type: "button", className: "secondary", textContent: "I checked: accept the new key" });
      accept.addEventListener("click", () => { session?.acceptNewKey(p.peerId); });
      li.append(warn, accept);
    } else if (p.shortCode && p.trust !== "verified") {
      const verify = el("button", { type: "button", className: "secondary", textContent: "Codes match: mark verified" });
      verify.addEventListener("click", () => { session?.verifyPeer(p.peerId); });
      li.append(verify);
    }
    if (p.reason) li.append(el("span", { className: "reason", textContent: p.reason }));
    return li;
  });
  list.replaceChildren(...items);
  $("peer-count").textContent = String(peers.size);
  $("no-peers").hidden = peers.size > 0;
  withFiles((f) => f.peersChanged());
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard permission (or not a secure context): copy through a selection.
    const area = el("textarea", { value: text, readOnly: true, className: "offscreen" });
    document.body.append(area);
    area.select();
    try { document.execCommand("copy"); } finally { area.remove(); }
  }
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = label; }, 1500);
}

function addMessage({ name, text, at, mine, trust, looksLike }) {
  const time = new Date(at);
  // A multi-line or long text is a snippet: kept as typed, in a block of its own.
  const snippet = text.includes("\n") || text.length > 160;
  const copy = el("button", { type: "button", className: "small ghost copy", textContent: "Copy" });
  copy.setAttribute("aria-label", `Copy the message from ${name}`);
  copy.addEventListener("click", () => copyText(text, copy));
  const li = el("li", { className: [mine ? "mine" : "", snippet ? "snippet" : ""].join(" ").trim() },
    el("span", { className: "from", textContent: name }),
    trustBadge({ trust, looksLike, mine }),
    snippet ? "" : el("span", { className: "text", textContent: text }),
    el("time", { dateTime: time.toISOString(), textContent: time.toLocaleTimeString() }),
    copy);
  if (snippet) li.append(el("pre", { className: "text", textContent: text }));
  $("messages").append(li);
  li.scrollIntoView({ block: "nearest" });
}

function onEvent(ev) {
  switch (ev.type) {
    case "status": setStatus(ev.status, ev.detail); break;
    case "joined":
      // After a reconnect the list is the whole truth.
      for (const id of peers.keys()) if (!ev.peers.includes(id)) peers.delete(id);
      renderPeers();
      break;
    case "peer_joined":
      if (!peers.has(ev.peerId)) peers.set(ev.peerId, { peerId: ev.peerId, state: "connecting" });
      renderPeers();
      break;
    case "peer_left": peers.delete(ev.peerId); renderPeers(); break;
    case "peer": peers.set(ev.peerId, ev); renderPeers(); break;
    case "message": addMessage({ ...ev, mine: false }); break;
    case "passphrase_failures": {
      passphraseFailures.set(ev.peerId, ev.failures);
      const notice = $("passphrase-notice");
      notice.textContent = [...passphraseFailures].map(([id, n]) =>
        `${n} failed passphrase attempt${n === 1 ? "" : "s"} from ${id}`).join("; ")
        + " (a wrong passphrase, or someone guessing it: each try is answered later than the last)";
      notice.hidden = false;
      break;
    }
    case "error": setStatus("error", `${ev.code}: ${ev.message}`); break;
  }
  withFiles((f) => f.onEvent(ev));
}

function displayName() {
  const name = $("display-name").value.trim();
  if (name) localStorage.setItem("weft.name", name);
  return name || undefined;
}

async function join(options) {
  loadFiles().catch((e) => console.error("weft: the file-transfer UI did not load", e));
  showError("join-error", "");
  passphraseFailures.clear();
  $("passphrase-notice").hidden = true;
  session?.leave();
  session = null;
  withFiles((f) => f.detach());
  peers.clear();
  setStatus(options.passphrase ? "deriving_key" : "connecting",
    options.passphrase ? "Stretching the passphrase (about two seconds)…" : "");
  try {
    // `?downloads=stream` in the page's address: downloads go straight into the browser's
    // downloads folder (as where OPFS is missing) instead of the page's storage.
    const downloads = new URLSearchParams(location.search).get("downloads") === "stream" ? "stream" : "auto";
    session = await weft.WeftSession.join({ ...options, name: displayName(), downloads, onEvent: dispatch });
  } catch (e) {
    setStatus("ready");
    showError("join-error", String(e?.message ?? e));
    return;
  }
  session.onEvent(dispatch);
  const invite = session.invite;
  $("invite-box").hidden = !invite;
  // The invite is the network's only secret: once joined it leaves the address bar (and
  // so the history, bookmarks and anything that reads the address); this tab keeps it in
  // sessionStorage so that a reload rejoins. The invite box still shows it to share.
  history.replaceState(null, "", location.pathname + location.search);
  if (invite) {
    const link = `${location.origin}${location.pathname}#invite=${invite}`;
    $("invite-link").value = link;
    sessionStorage.setItem(INVITE_KEY, invite);
    if (typeof weft.qrSvg === "function") $("qr").innerHTML = weft.qrSvg(link);
  } else {
    sessionStorage.removeItem(INVITE_KEY);
  }
  $("network-title").textContent = session.network ? `network “${session.network}”` : "invite network";
  $("own-code").textContent = session.identity.shortCode;
  $("messages").replaceChildren();
  $("join-panel").hidden = true;
  $("room-panel").hidden = false;
  document.body.classList.add("in-room");
  for (const p of session.peers()) peers.set(p.peerId, p);
  const joined = session;
  withFiles((f) => f.attach(joined));
  renderPeers();
}

function leave() {
  session?.leave();
  session = null;
  withFiles((f) => f.detach());
  peers.clear();
  document.body.classList.remove("in-room");
  sessionStorage.removeItem(INVITE_KEY);
  history.replaceState(null, "", location.pathname + location.search);
  $("join-panel").hidden = false;
  $("room-panel").hidden = true;
  $("network-title").textContent = "";
  setStatus("ready");
}

function sendMessage(ev) {
  ev.preventDefault();
  const input = $("message-input");
  const text = input.value;
  if (!text.trim() || !session) return;
  try {
    const sent = session.sendMessage(text);
    if (sent === 0) {
      showError("message-error", "No one is connected yet: the message was not sent.");
      return;
    }
    showError("message-error", "");
    addMessage({ name: "you", text, at: Date.now(), mine: true });
    input.value = "";
    fitMessageInput();
  } catch (e) {
    showError("message-error", String(e?.message ?? e));
  }
}

// The message box grows with its text (up to a limit set in style.css).
function fitMessageInput() {
  if (CSS.supports?.("field-sizing", "content")) return;
  const input = $("message-input");
  input.style.height = "auto";
  input.style.height = `${input.scrollHeight + 2}px`;
}

async function main() {
  try {
    await init();
  } catch (e) {
    setStatus("error", "");
    showError("join-error", `Weft could not load its WebAssembly core: ${e}`);
    return;
  }
  $("version").textContent = `Weft · signaling protocol v${weft.protocolVersion()}`;
  $("display-name").value = localStorage.getItem("weft.name") ?? "";
  $("create").addEventListener("click", () => join({ invite: weft.createInvite() }));
  $("passphrase-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    join({ network: $("network-name").value.trim(), passphrase: $("passphrase").value });
  });
  $("leave").addEventListener("click", leave);
  $("message-form").addEventListener("submit", sendMessage);
  $("message-input").addEventListener("input", fitMessageInput);
  $("message-input").addEventListener("keydown", (ev) => {
    // Enter sends; Shift+Enter (or Enter while composing with an IME) makes a new line.
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("message-form").requestSubmit();
    }
  });
  $("copy-invite").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText($("invite-link").value); } catch { $("invite-link").select(); }
  });
  // Tests and embedders reach the session here.
  window.weft = {
    get session() { return session; },
    get peers() { return [...peers.values()]; },
    get transfers() { return files?.snapshot() ?? null; },
    sendFiles: async (entries, to) => (await loadFiles()).send(entries, to),
    join,
    leave,
    on(listener) { listeners.add(listener); return () => listeners.delete(listener); },
  };
  const invite = new URLSearchParams(location.hash.slice(1)).get("invite") ?? sessionStorage.getItem(INVITE_KEY);
  if (invite) join({ invite }); else setStatus("ready");
}

main();
