// Weft web app glue: the page's UI on top of the WASM core's JavaScript API.
import init, { WeftSession, protocolVersion, isValidRoomId } from "./pkg/weft_wasm.js";

const $ = (id) => document.getElementById(id);
let session = null;

function setStatus(status, detail) {
  document.body.dataset.status = status;
  $("status").textContent = status;
  $("status-detail").textContent = detail ?? "";
}

function renderPeers() {
  const peers = session ? session.peers() : [];
  const list = $("peers");
  list.replaceChildren(...peers.map((id) => {
    const li = document.createElement("li");
    li.textContent = id;
    li.dataset.peerId = id;
    return li;
  }));
  $("peer-count").textContent = String(peers.length);
  $("no-peers").hidden = peers.length > 0;
}

function showError(message) {
  const el = $("join-error");
  el.textContent = message;
  el.hidden = !message;
}

function join(room) {
  if (!isValidRoomId(room)) {
    showError("A room name is 1 to 128 letters, digits, '-' or '_'.");
    return;
  }
  showError("");
  session?.leave();
  session = WeftSession.join({ room });
  session.onEvent((ev) => {
    switch (ev.type) {
      case "status": setStatus(ev.status, ev.detail); break;
      case "joined": $("own-id").textContent = ev.peerId; renderPeers(); break;
      case "peer_joined":
      case "peer_left": renderPeers(); break;
      case "error": setStatus("error", `${ev.code}: ${ev.message}`); break;
    }
  });
  history.replaceState(null, "", `#room=${encodeURIComponent(room)}`);
  $("room-name").textContent = room;
  $("join-panel").hidden = true;
  $("room-panel").hidden = false;
  setStatus("connecting");
  renderPeers();
}

function leave() {
  session?.leave();
  session = null;
  history.replaceState(null, "", location.pathname);
  $("join-panel").hidden = false;
  $("room-panel").hidden = true;
  setStatus("ready");
}

async function main() {
  try {
    await init();
  } catch (e) {
    setStatus("error", "");
    showError(`Weft could not load its WebAssembly core: ${e}`);
    return;
  }
  $("version").textContent = `Weft signaling protocol v${protocolVersion()}`;
  $("join-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    join($("room").value.trim());
  });
  $("leave").addEventListener("click", leave);
  // Tests and embedders reach the session here.
  window.weft = { get session() { return session; }, join, leave };
  const room = new URLSearchParams(location.hash.slice(1)).get("room");
  if (room) join(room); else setStatus("ready");
}

main();
