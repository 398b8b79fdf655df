// @ts-check
// Weft embedded in a plain page, no bundler: join a network, chat, and receive files with
// progress. `npm install weft` (or the tarball of `cargo xtask package`) next to this file,
// serve the folder from any static host, and open
//   index.html?server=wss://your-weft-server/ws&name=Ada#invite=<invite>
// The Weft server must let this page's origin in: `weft-signal --allowed-origin <origin>`.
// Checked against the package's types by `tsc -p .` (see tsconfig.json).
import init, { WeftSession } from "./node_modules/weft/weft_wasm.js";

/** @typedef {import("./node_modules/weft/weft_wasm.js").JsEvent} WeftEvent */

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const query = new URLSearchParams(location.search);
const invite = new URLSearchParams(location.hash.slice(1)).get("invite") ?? undefined;

/** What happened, for whoever drives this page (a test, the console). */
const example = {
  /** @type {WeftEvent[]} */ events: [],
  /** @type {{ name: string, size: number }[]} */ files: [],
  /** @type {WeftSession | null} */ session: null,
  /** @type {string | null} */ error: null,
};
Object.assign(window, { example });

/** @param {string} list @param {string} text */
function show(list, text) {
  $(list).append(Object.assign(document.createElement("li"), { textContent: text }));
}

/** @param {WeftSession} session @param {string} key */
async function keep(session, key) {
  const file = await session.downloadedFile(key); // a File, named after its path
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
  /** @type {WeftSession | null} */
  let session = null;
  /** @param {WeftEvent} ev */
  const onEvent = (ev) => {
    example.events.push(ev);
    if (ev.type === "message") show("messages", `${ev.name}: ${ev.text}`);
    if (ev.type === "offer") session?.acceptOffer(ev.peerId, ev.offerId); // take every file
    if (ev.type === "progress") {
      $("status").textContent = `${ev.paths[0]}: ${Math.floor((100 * ev.doneBytes) / Math.max(ev.size, 1))} %`;
    }
    if (ev.type === "file_complete" && session) keep(session, ev.key).catch((e) => show("files", String(e)));
  };
  // Resolves once joined (ownId set), or rejects with the reason (unreachable, refused…).
  const joined = await WeftSession.join({
    invite,
    name: query.get("name") ?? "Example",
    server: query.get("server") ?? undefined,
    onEvent,
  });
  session = example.session = joined;
  $("status").textContent = `joined as ${joined.ownId}`;
  $("send").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = /** @type {HTMLInputElement} */ ($("text"));
    joined.sendMessage(input.value);
    input.value = "";
  });
  addEventListener("pagehide", () => joined.leave());
}

main().catch((e) => {
  example.error = String(e?.message ?? e);
  $("status").textContent = `cannot join: ${example.error}`;
});
