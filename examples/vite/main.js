// Weft through a bundler: the same API as the plain example, imported by package name.
import init, { WeftSession } from "weft";

const query = new URLSearchParams(location.search);
const invite = new URLSearchParams(location.hash.slice(1)).get("invite") ?? undefined;
const example = (window.example = { events: [], session: null, error: null });

async function main() {
  await init();
  const session = await WeftSession.join({
    invite,
    name: query.get("name") ?? "Vite",
    server: query.get("server") ?? undefined,
    onEvent: (ev) => {
      example.events.push(ev);
      if (ev.type === "message") {
        const li = Object.assign(document.createElement("li"), { textContent: `${ev.name}: ${ev.text}` });
        document.getElementById("messages").append(li);
      }
    },
  });
  example.session = session;
  document.getElementById("status").textContent = `joined as ${session.ownId}`;
}

main().catch((e) => {
  example.error = String(e?.message ?? e);
  document.getElementById("status").textContent = `cannot join: ${example.error}`;
});
