// llama-jax chat page: talks to this server's OpenAI API (same origin), keeps conversations in
// localStorage, streams answers over SSE (fetch + ReadableStream) and renders them as Markdown.
import { Marked } from "./vendor/marked/marked.esm.js";

const $ = (id) => document.getElementById(id);
const KEY = { convs: "llama-jax.conversations", current: "llama-jax.current", settings: "llama-jax.settings", apiKey: "llama-jax.api-key" };
const load = (k, fallback) => { try { return JSON.parse(localStorage.getItem(k)) ?? fallback; } catch { return fallback; } };
const save = (k, v) => localStorage.setItem(k, JSON.stringify(v));

let conversations = load(KEY.convs, []);
let current = conversations.find((c) => c.id === load(KEY.current, null)) ?? null;
let controller = null; // the AbortController of the answer being streamed
const empty = $("empty");

// ---- Markdown, with every bit of HTML in the model's output shown as text ----

const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const safeUrl = (href) => {
  try {
    const url = new URL(href, location.href);
    return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
  } catch { return null; }
};
const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    html: ({ text }) => escapeHtml(text),
    // No images: they would load from wherever the model points (and CSP blocks them anyway).
    image: ({ href, text }) => { const u = safeUrl(href); return u ? `<a href="${escapeHtml(u)}">${escapeHtml(text || u)}</a>` : escapeHtml(text); },
  },
});
// Allow-list pass over marked's output in an inert <template>: nothing unexpected survives.
const TAGS = new Set("P BR HR H1 H2 H3 H4 H5 H6 STRONG EM DEL CODE PRE BLOCKQUOTE UL OL LI A TABLE THEAD TBODY TR TH TD INPUT".split(" "));
const ATTRS = { A: ["href", "title"], CODE: ["class"], OL: ["start"], TH: ["align"], TD: ["align"], INPUT: ["type", "checked", "disabled"] };
function sanitize(node) {
  for (const el of [...node.children]) {
    if (!TAGS.has(el.tagName) || (el.tagName === "INPUT" && el.getAttribute("type") !== "checkbox")) {
      el.replaceWith(document.createTextNode(el.textContent));
      continue;
    }
    for (const a of [...el.attributes]) if (!(ATTRS[el.tagName] ?? []).includes(a.name)) el.removeAttribute(a.name);
    if (el.tagName === "A") {
      const u = safeUrl(el.getAttribute("href") ?? "");
      if (u) { el.href = u; el.target = "_blank"; el.rel = "noopener noreferrer"; } else el.removeAttribute("href");
    }
    if (el.tagName === "INPUT") el.disabled = true;
    sanitize(el);
  }
}
function renderMarkdown(el, text) {
  const t = document.createElement("template");
  t.innerHTML = marked.parse(text);
  sanitize(t.content);
  for (const pre of t.content.querySelectorAll("pre")) {
    if (!navigator.clipboard) break;
    const b = document.createElement("button");
    b.type = "button"; b.className = "copy"; b.textContent = "Copy";
    b.addEventListener("click", () => navigator.clipboard.writeText(pre.querySelector("code")?.textContent ?? pre.textContent)
      .then(() => { b.textContent = "Copied"; setTimeout(() => (b.textContent = "Copy"), 1200); }));
    pre.prepend(b);
  }
  el.replaceChildren(t.content);
}

// ---- settings and API ----

const fields = { system: $("system"), temperature: $("temperature"), top_p: $("top-p"), max_tokens: $("max-tokens") };
const settings = load(KEY.settings, {});
for (const [k, el] of Object.entries(fields)) {
  if (settings[k] !== undefined) el.value = settings[k];
  el.addEventListener("change", () => { settings[k] = el.value; save(KEY.settings, settings); });
}
$("api-key").value = localStorage.getItem(KEY.apiKey) ?? "";
$("api-key").addEventListener("change", () => {
  const v = $("api-key").value.trim();
  v ? localStorage.setItem(KEY.apiKey, v) : localStorage.removeItem(KEY.apiKey);
  loadModels();
});
$("model").addEventListener("change", () => { settings.model = $("model").value; save(KEY.settings, settings); });

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY.apiKey);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The server's OpenAI error object as one readable line.
async function errorMessage(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
  } catch { /* not JSON: keep the status text */ }
  const hint = {
    401: " Set the API key in Settings.",
    429: response.headers.get("Retry-After") ? ` Retry in ${response.headers.get("Retry-After")} s.` : "",
    503: " The server is busy or still loading; try again shortly.",
  }[response.status] ?? "";
  return `Error ${response.status}: ${message}${hint}`;
}

function showError(text) {
  $("error").textContent = text ?? "";
  $("error").hidden = !text;
}

async function loadModels() {
  const select = $("model");
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) {
      showError(await errorMessage(r));
      if (r.status === 401) { $("settings").open = true; document.body.classList.add("menu-open"); }
      return;
    }
    const { data } = await r.json();
    select.replaceChildren(...data.map((m) => {
      const o = new Option(m.id, m.id);
      if (m.meta?.n_ctx) o.title = `context ${m.meta.n_ctx} tokens`;
      return o;
    }));
    if (data.some((m) => m.id === settings.model)) select.value = settings.model;
    if (!data.length) showError("The server serves no model.");
    else if ($("error").textContent.startsWith("Error 401")) showError(null);
  } catch (e) {
    showError(`Cannot reach the server: ${e.message}`);
  }
}

// ---- conversations ----

function persist() {
  save(KEY.convs, conversations);
  save(KEY.current, current?.id ?? null);
}

function newChat() {
  current = null;
  persist();
  render();
  $("input").focus();
}

function renderList() {
  $("conversations").replaceChildren(...conversations.map((c) => {
    const li = document.createElement("li");
    li.className = c === current ? "active" : "";
    const open = document.createElement("button");
    open.type = "button"; open.className = "open"; open.textContent = c.title;
    open.addEventListener("click", () => { if (!controller) { current = c; persist(); render(); document.body.classList.remove("menu-open"); } });
    const del = document.createElement("button");
    del.type = "button"; del.className = "delete"; del.textContent = "\u00d7";
    del.setAttribute("aria-label", `Delete ${c.title}`);
    del.addEventListener("click", () => {
      if (controller && c === current) return;
      conversations = conversations.filter((x) => x !== c);
      if (c === current) current = null;
      persist(); render();
    });
    li.append(open, del);
    return li;
  }));
}

function messageElement(m) {
  const div = document.createElement("div");
  div.className = `message ${m.role}`;
  const body = document.createElement("div");
  body.className = "body";
  if (m.role === "assistant") renderMarkdown(body, m.content); else body.textContent = m.content;
  div.append(body);
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.textContent = m.stats ?? "";
  div.append(stats);
  return div;
}

function render() {
  renderList();
  $("title").textContent = current?.title ?? "New chat";
  const msgs = current?.messages ?? [];
  $("messages").replaceChildren(...(msgs.length ? msgs.map(messageElement) : [empty]));
  scrollDown(true);
}

function scrollDown(force) {
  const box = $("messages");
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) box.scrollTop = box.scrollHeight;
}

// ---- sending and streaming ----

function setBusy(busy) {
  document.body.classList.toggle("busy", busy);
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function number(el, parse) {
  const v = parse(el.value);
  return Number.isFinite(v) ? v : undefined;
}

function formatStats({ usage, chunks, t0, tFirst, tEnd, stopped, model }) {
  const n = usage?.completion_tokens ?? chunks;
  const secs = tFirst && n > 1 && tEnd > tFirst ? (tEnd - tFirst) / 1000 : (tEnd - t0) / 1000;
  const rate = secs > 0 ? ((tFirst && n > 1 ? n - 1 : n) / secs).toFixed(1) : "–";
  const parts = [`${usage ? "" : "~"}${n} tokens`, `${rate} tok/s`];
  if (usage) parts.push(`prompt ${usage.prompt_tokens}`);
  if (tFirst) parts.push(`first token ${((tFirst - t0) / 1000).toFixed(2)} s`);
  parts.push(model);
  if (stopped) parts.push("stopped");
  return parts.join(" · ");
}

async function send(text) {
  const model = $("model").value;
  if (!text.trim() || controller) return;
  if (!model) { showError("No model to talk to: the model list is empty (is an API key needed?)."); return; }
  showError(null);
  if (!current) {
    current = { id: crypto.randomUUID?.() ?? String(Date.now() + Math.random()), title: text.trim().replace(/\s+/g, " ").slice(0, 40), messages: [] };
    conversations.unshift(current);
  }
  const conv = current;
  conv.messages.push({ role: "user", content: text });
  const answer = { role: "assistant", content: "" };
  const system = fields.system.value.trim();
  const body = {
    model,
    messages: [...(system ? [{ role: "system", content: system }] : []), ...conv.messages.map(({ role, content }) => ({ role, content }))],
    stream: true,
    stream_options: { include_usage: true },
    reasoning_format: "none", // a reasoning model's <think> block is shown as it streams, inline
    temperature: number(fields.temperature, parseFloat),
    top_p: number(fields.top_p, parseFloat),
    max_tokens: number(fields.max_tokens, (v) => parseInt(v, 10)),
  };
  persist(); render();
  const el = messageElement(answer);
  el.classList.add("streaming");
  $("messages").append(el);
  scrollDown(true);

  controller = new AbortController();
  setBusy(true);
  const s = { usage: null, chunks: 0, t0: performance.now(), tFirst: 0, tEnd: 0, stopped: false, model };
  let failure = null;
  let pending = false;
  const paint = () => { pending = false; renderMarkdown(el.querySelector(".body"), answer.content); scrollDown(); };
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) throw new Error(await errorMessage(r));
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let done = false;
    while (!done) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") { done = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(`Error: ${chunk.error.message}`);
        if (chunk.usage) s.usage = chunk.usage;
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          if (!s.tFirst) s.tFirst = performance.now();
          s.chunks += 1;
          answer.content += delta;
          if (!pending) { pending = true; requestAnimationFrame(paint); }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") s.stopped = true; else failure = e.message.startsWith("Error") ? e.message : `Error: ${e.message}`;
  } finally {
    s.tEnd = performance.now();
    controller = null;
    setBusy(false);
  }
  if (failure && !answer.content) {
    // Nothing came back: take the message back into the input box so it can be resent.
    conv.messages.pop();
    if (!conv.messages.length) { conversations = conversations.filter((c) => c !== conv); if (current === conv) current = null; }
    if (!input.value) { input.value = text; grow(); }
  } else {
    answer.stats = formatStats(s);
    conv.messages.push(answer);
  }
  persist();
  if (current === conv || !current) render();
  showError(failure);
  $("input").focus();
}

// ---- wiring ----

const input = $("input");
const grow = () => { input.style.height = "auto"; input.style.height = `${Math.min(input.scrollHeight, 200)}px`; };
input.addEventListener("input", grow);
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  if (e.key === "Escape" && controller) controller.abort();
});
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value;
  if (!text.trim() || controller) return;
  input.value = ""; grow();
  send(text);
});
$("stop").addEventListener("click", () => controller?.abort());
$("error").addEventListener("click", () => showError(null));
$("new-chat").addEventListener("click", () => { if (!controller) { newChat(); document.body.classList.remove("menu-open"); } });
$("menu").addEventListener("click", () => document.body.classList.toggle("menu-open"));
$("backdrop").addEventListener("click", () => document.body.classList.remove("menu-open"));

render();
loadModels();
input.focus();
