// Weft embedded in a plain page, no bundler: join a network, chat, and receive files with
// progress. `npm install weft` (or the tarball of `cargo xtask package`) next to this file,
// serve the folder from any static host, and open
//   index.html?server=wss://your-weft-server/ws&name=Ada#invite=<invite>
// The Weft server must let this page's origin in: `weft-signal --allowed-origin <origin>`.
import init, { WeftSession } from "./node_modules/weft/weft_wasm.js";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const invite = new URLSearchParams(location.hash.slice(1)).get("invite");
// What happened, for whoever drives this page (a test, the console).
const example = (window.example = { events: [], files: [], session: null, error: null });

function show(list, text) {
  $(list).append(Object.assign(document.createElement("li"), { textContent: text }));
}

async function keep(session, root) {
  const file = await session.downloadedFile(root); // a File, named after its path
  example.files.push({ name: file.name, size: file.size });
  const link = Object.assign(document.createElement("a"), {
    href: URL.createObjectURL(file), download: file.name, textContent: `${file.name} (${file.size} bytes)`,
  });
  const item = document.createElement("li");
  item.append(link);
  $("files").append(item);
}

async function main() {
  await init(); // fetches weft_wasm_bg.wasm beside the module
  let session = null;
  const onEvent = (ev) => {
    example.events.push(ev);
    if (ev.type === "message") show("messages", `${ev.name}: ${ev.text}`);
    if (ev.type === "offer") session.acceptOffer(ev.peerId, ev.offerId); // take every file
    if (ev.type === "progress") {
      $("status").textContent = `${ev.paths[0]}: ${Math.floor((100 * ev.doneBytes) / Math.max(ev.size, 1))} %`;
    }
    if (ev.type === "file_complete") keep(session, ev.root).catch((e) => show("files", String(e)));
  };
  // Resolves once joined (ownId set), or rejects with the reason (unreachable, refused…).
  session = await WeftSession.join({ invite, name: query.get("name") ?? "Example", server: query.get("server"), onEvent });
  example.session = session;
  $("status").textContent = `joined as ${session.ownId}`;
  $("send").addEventListener("submit", (ev) => {
    ev.preventDefault();
    session.sendMessage($("text").value);
    $("text").value = "";
  });
  addEventListener("pagehide", () => session.leave());
}

main().catch((e) => {
  example.error = String(e.message ?? e);
  $("status").textContent = `cannot join: ${example.error}`;
});
