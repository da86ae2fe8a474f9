// quill playground: a chat with the model (POST /v1/chat/completions) or a completion of a text
// (POST /v1/completions), both streamed as Server-Sent Events. No build step, no outside requests.
"use strict";

const $ = (id) => document.getElementById(id);
const page = document.body.dataset;
let controller = null; // AbortController of the running request; aborting frees the server's slot
let history = []; // the conversation: {role, content}, system prompt not included
let statsMode = null; // the mode whose request the stats line describes: shown in that mode only

// --- shared: settings, errors, stats, streaming ---------------------------------------------------

function numberField(id, parse) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : parse(raw);
}

function sampling() {
  const body = {
    max_tokens: numberField("max_tokens", (v) => parseInt(v, 10)),
    temperature: numberField("temperature", parseFloat),
    top_k: numberField("top_k", (v) => parseInt(v, 10)),
    top_p: numberField("top_p", parseFloat),
    seed: numberField("seed", (v) => parseInt(v, 10)),
    stream: true,
    stream_options: { include_usage: true },
  };
  for (const k of Object.keys(body)) if (Number.isNaN(body[k])) delete body[k];
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showStats(tokens, started, done, note = "") {
  const seconds = (performance.now() - started) / 1000;
  const rate = seconds > 0 ? tokens / seconds : 0;
  $("stats").textContent =
    `${tokens} tokens · ${rate.toFixed(1)} tokens/s · ${seconds.toFixed(2)} s${done ? "" : " …"}${note}`;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("send").disabled = running || page.chat !== "true";
  for (const id of ["stop", "chat-stop"]) $(id).disabled = !running;
  updateChatButtons();
}

// POST `body` to `url` and call onChunk(message) for every SSE event until [DONE].
async function stream(url, body, onChunk) {
  controller = new AbortController();
  const r = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal: controller.signal,
  });
  if (!r.ok) {
    const err = await r.json().catch(() => ({}));
    throw new Error(err.error ? err.error.message : `HTTP ${r.status}`);
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      const msg = JSON.parse(data);
      if (msg.error) throw new Error(msg.error.message);
      onChunk(msg);
    }
  }
}

// Runs one streamed request: stats while it runs, errors shown, the buttons set back after.
// Text and its tokens' logprobs go to `out` (a TokenText) at most once per frame, however fast
// the model writes: the page stays responsive (and Stop clickable) while a small model streams
// thousands of tokens a second. onFrame runs after each of those updates.
async function run(url, body, out, onFrame) {
  showError("");
  hideTip();
  statsMode = document.body.dataset.mode;
  $("stats").hidden = false;
  $("stats").textContent = "waiting…";
  setRunning(true);
  const started = performance.now();
  let tokens = 0;
  let finish = null;
  let pending = "";
  let entries = [];
  let frame = 0;
  const flush = () => {
    if (frame) cancelAnimationFrame(frame);
    frame = 0;
    if (pending || entries.length) {
      out.add(pending, entries);
      if (onFrame) onFrame();
    }
    pending = "";
    entries = [];
  };
  try {
    await stream(url, body, (msg) => {
      if (msg.usage) tokens = msg.usage.completion_tokens; // exact count at the end
      for (const c of msg.choices) {
        if (c.delta && c.delta.quill_tools && out.tools) {
          flush(); // the text before the call stays before it
          out.tools(c.delta.quill_tools);
        }
        const text = c.delta ? c.delta.content : c.text;
        if (text) {
          pending += text;
          if (!msg.usage) tokens += 1; // one chunk per decoding step while streaming
        }
        if (c.logprobs) entries.push(...logprobEntries(c.logprobs));
        if (c.finish_reason) finish = c.finish_reason;
      }
      if (!frame) frame = requestAnimationFrame(() => { frame = 0; flush(); showStats(tokens, started, false); });
    });
    flush();
    showStats(tokens, started, true, finish === "length" ? " · stopped at max tokens" : "");
    return { ok: true, finish };
  } catch (e) {
    flush(); // what arrived before a stop or an error stays on the page
    if (e.name === "AbortError") {
      showStats(tokens, started, true, " · stopped");
      return { ok: true, finish: "stopped" };
    }
    $("stats").textContent = "";
    showError(String(e.message || e));
    return { ok: false };
  } finally {
    out.end();
    controller = null;
    setRunning(false);
  }
}

// --- tokens: each generated token its own span, with its probability and the alternatives ----------

// A chunk's logprobs, either API's shape, as [{token, bytes, logprob, alts: [{token, logprob}]}]:
// chat's `content` list, or the completions API's legacy columns (whose pieces of a character
// are written "bytes:\\xNN").
function logprobEntries(lp) {
  if (lp.content) {
    return lp.content.map((e) => ({ token: e.token, bytes: new Uint8Array(e.bytes), logprob: e.logprob,
      alts: e.top_logprobs.map((a) => ({ token: a.token, logprob: a.logprob })) }));
  }
  return lp.tokens.map((token, i) => ({
    token,
    bytes: token.startsWith("bytes:")
      ? new Uint8Array([...token.matchAll(/\\x([0-9a-f]{2})/g)].map((m) => parseInt(m[1], 16)))
      : new TextEncoder().encode(token),
    logprob: lp.token_logprobs[i],
    alts: Object.entries(lp.top_logprobs[i] || {}).map(([t, l]) => ({ token: t, logprob: l }))
      .sort((a, b) => b.logprob - a.logprob),
  }));
}

const tokenData = new WeakMap(); // span -> the tokens it shows (more than one: pieces of a character)

// Generated text in `el`, one span per token. A token's logprobs can come a chunk before its
// text (text that may be the start of a stop string is held back), so text and tokens queue up
// and a span is made once its token's text has arrived. Tokens that are only pieces of a UTF-8
// character share the span of the character. Each frame appends its spans as one fragment.
class TokenText {
  constructor(el) {
    this.el = el;
    this.text = ""; // text arrived, not yet in a span
    this.queue = []; // tokens whose text has not arrived yet: {text, parts}
    this.carry = []; // pieces of a character still incomplete
    this.decoder = new TextDecoder();
    this.first = true;
  }

  add(text, entries) {
    this.text += text;
    for (const e of entries) {
      this.carry.push(e);
      const piece = this.decoder.decode(e.bytes, { stream: true });
      if (piece) {
        this.queue.push({ text: piece, parts: this.carry });
        this.carry = [];
      }
    }
    this.render(false);
  }

  // the stream ended (or stopped): what is left; a token cut by a stop string keeps its data
  end() {
    const rest = this.decoder.decode(); // a character left unfinished: U+FFFD, as the server writes it
    if (rest && this.carry.length) this.queue.push({ text: rest, parts: this.carry });
    this.carry = [];
    this.render(true);
    this.queue = [];
  }

  render(final) {
    const frag = document.createDocumentFragment();
    while (this.text) {
      const tok = this.queue[0];
      if (tok && this.text.startsWith(tok.text)) {
        frag.append(this.span(tok.text, tok.parts));
        this.text = this.text.slice(tok.text.length);
        this.queue.shift();
      } else if (tok && tok.text.startsWith(this.text)) {
        if (!final) break; // the rest of this token's text is still held back
        frag.append(this.span(this.text, tok.parts));
        this.text = "";
      } else {
        frag.append(this.text); // text without its token's logprobs: shown as it is
        this.text = "";
        this.queue = [];
      }
    }
    if (frag.childNodes.length) this.el.append(frag);
  }

  // the server's built-in tool calls and results (quill_tools): collapsed, monospaced, in place
  tools(parts) {
    this.render(true);
    this.queue = []; // the logprobs of the call's own tokens: their text is in the box, not here
    this.carry = [];
    for (const p of parts) {
      const box = document.createElement("details");
      box.className = `tool tool-${p.type === "call" ? "call" : "result"}`;
      const summary = document.createElement("summary");
      summary.textContent = p.type === "call" ? `tool call: ${p.text.split(" ")[0]}` : "tool result";
      const body = document.createElement("pre");
      body.textContent = p.text;
      box.append(summary, body);
      this.el.append(box);
    }
  }

  span(text, parts) {
    const s = document.createElement("span");
    s.className = "tok";
    s.textContent = text;
    s.tabIndex = this.first ? 0 : -1; // one tab stop per text; arrow keys move between tokens
    this.first = false;
    tokenData.set(s, parts);
    return s;
  }
}

function percent(logprob) {
  const p = Math.exp(logprob) * 100;
  return p >= 0.01 ? `${p.toFixed(2)}%` : `${p.toExponential(1)}%`;
}

function tokenLabel(token) {
  if (token.startsWith("bytes:")) return token.slice(6); // a piece of a character (completions)
  return `“${token.replace(/\n/g, "\\n").replace(/\r/g, "\\r").replace(/\t/g, "\\t")}”`;
}

function tipSection(e) {
  const section = document.createElement("div");
  section.className = "tip-token";
  const head = document.createElement("p");
  head.className = "tip-head";
  const label = document.createElement("code");
  label.textContent = tokenLabel(e.token);
  const p = document.createElement("b");
  p.className = "tip-p";
  p.dataset.logprob = String(e.logprob);
  p.textContent = percent(e.logprob);
  head.append(label, " ", p);
  const list = document.createElement("ol");
  list.className = "tip-alts";
  list.setAttribute("aria-label", "most likely tokens here");
  for (const a of e.alts) {
    const li = document.createElement("li");
    li.dataset.token = a.token;
    li.dataset.logprob = String(a.logprob);
    if (a.token === e.token) li.className = "chosen";
    const name = document.createElement("code");
    name.textContent = tokenLabel(a.token);
    const track = document.createElement("span"); // the bar: the probability out of 100%
    track.className = "track";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(Math.exp(a.logprob) * 100).toFixed(1)}%`;
    track.append(bar);
    const value = document.createElement("span");
    value.className = "p";
    value.textContent = percent(a.logprob);
    li.append(name, track, value);
    list.append(li);
  }
  const caption = document.createElement("p");
  caption.className = "tip-caption";
  caption.textContent = e.alts.length ? "likeliest here:" : "";
  section.append(head, caption, list);
  return section;
}

let tipFor = null; // the token span the tip describes

function showTip(span) {
  const parts = tokenData.get(span);
  if (!parts) return;
  if (tipFor !== span) {
    if (tipFor) tipFor.removeAttribute("aria-describedby");
    $("token-tip").replaceChildren(...parts.map(tipSection));
    span.setAttribute("aria-describedby", "token-tip");
    tipFor = span;
  }
  $("token-tip").hidden = false;
  placeTip();
}

function hideTip() {
  if (tipFor) tipFor.removeAttribute("aria-describedby");
  tipFor = null;
  $("token-tip").hidden = true;
}

// below the token, or above it where there is no room below; always inside the window
function placeTip() {
  if (!tipFor) return;
  const tip = $("token-tip");
  const r = tipFor.getBoundingClientRect();
  const left = Math.max(4, Math.min(r.left, window.innerWidth - tip.offsetWidth - 4));
  const below = r.bottom + 6;
  const top = below + tip.offsetHeight <= window.innerHeight ? below : Math.max(4, r.top - tip.offsetHeight - 6);
  tip.style.left = `${left}px`;
  tip.style.top = `${top}px`;
}

// keyboard: ←/→ the previous/next token of the same text, Home/End its first/last, Esc hides the tip
function moveToken(event) {
  const span = event.target.closest(".tok");
  if (!span) return;
  if (event.key === "Escape") {
    hideTip();
    return;
  }
  const all = event.key === "Home" || event.key === "End" ? [...span.parentElement.querySelectorAll(".tok")] : null;
  let next = null;
  if (event.key === "ArrowRight") next = span.nextElementSibling;
  else if (event.key === "ArrowLeft") next = span.previousElementSibling;
  else if (all) next = event.key === "Home" ? all[0] : all[all.length - 1];
  else return;
  event.preventDefault();
  if (!next || !next.classList.contains("tok")) return;
  span.tabIndex = -1;
  next.tabIndex = 0;
  next.focus();
}

function watchTokens(box) {
  box.addEventListener("mouseover", (e) => {
    const span = e.target.closest(".tok");
    if (span) showTip(span);
  });
  box.addEventListener("mouseout", (e) => {
    if (!e.target.closest(".tok") || e.relatedTarget?.closest?.(".tok")) return;
    const focused = document.activeElement;
    if (focused && focused.classList.contains("tok")) showTip(focused);
    else hideTip();
  });
  box.addEventListener("focusin", (e) => {
    const span = e.target.closest(".tok");
    if (span) showTip(span);
  });
  box.addEventListener("focusout", (e) => {
    if (!e.relatedTarget?.closest?.(".tok")) hideTip();
  });
  box.addEventListener("keydown", moveToken);
}

// --- complete mode --------------------------------------------------------------------------------

async function generate(event) {
  event.preventDefault();
  const body = { prompt: $("prompt").value, ...sampling() };
  $("out-prompt").textContent = body.prompt;
  $("out-text").textContent = "";
  await run("/v1/completions", { ...body, logprobs: 5 }, new TokenText($("out-text")));
}

// --- chat mode ------------------------------------------------------------------------------------

function bubble(role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  return li;
}

function renderMessages() {
  const list = $("messages");
  list.replaceChildren();
  if (!history.length) {
    const li = document.createElement("li");
    li.id = "empty-chat";
    li.className = "empty";
    li.textContent = "Send a message to start the conversation.";
    list.append(li);
  }
  for (const m of history) list.append(bubble(m.role, m.content));
  updateChatButtons();
}

function updateChatButtons() {
  const busy = controller !== null;
  $("clear").disabled = busy || !history.length;
  $("regenerate").disabled = busy || !history.length || history[history.length - 1].role !== "assistant";
}

function scrollToEnd() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

// Ask for the assistant's reply to `history` (which ends with the user's message).
async function reply() {
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  const li = bubble("assistant", "");
  li.classList.add("pending");
  $("messages").append(li);
  scrollToEnd();
  const text = li.querySelector(".text");
  const body = { messages, ...sampling(), logprobs: true, top_logprobs: 5 };
  const result = await run("/v1/chat/completions", body, new TokenText(text), () => {
    li.classList.remove("pending");
    scrollToEnd();
  });
  li.classList.remove("pending");
  if (!result.ok) {
    li.remove();
    return false;
  }
  if (result.finish === "length" || result.finish === "stopped") li.classList.add("cut");
  history.push({ role: "assistant", content: replyText(text) });
  updateChatButtons();
  return true;
}

// a reply's text without its tool calls and results (they are the server's, not the model's words)
function replyText(el) {
  return [...el.childNodes].filter((n) => !(n.nodeName === "DETAILS")).map((n) => n.textContent).join("");
}

async function send(event) {
  event.preventDefault();
  const box = $("message");
  const content = box.value;
  if (!content.trim() || controller) return;
  $("empty-chat")?.remove();
  history.push({ role: "user", content });
  $("messages").append(bubble("user", content));
  box.value = "";
  growComposer();
  if (!(await reply())) {
    history.pop(); // the server refused the message: give it back to edit
    $("messages").lastElementChild?.remove();
    box.value = content;
    if (!history.length) renderMessages();
  }
  box.focus();
}

async function regenerate() {
  if (controller || !history.length || history[history.length - 1].role !== "assistant") return;
  history.pop();
  $("messages").lastElementChild.remove(); // the replies before keep their tokens
  updateChatButtons();
  await reply();
}

function clearChat() {
  hideTip();
  history = [];
  renderMessages();
  showError("");
  $("stats").textContent = "";
  $("message").focus();
}

function growComposer() {
  const box = $("message");
  box.style.height = "auto";
  box.style.height = `${Math.min(box.scrollHeight, 200)}px`;
}

function showSystemState() {
  const text = $("system").value.trim();
  $("system-state").textContent = text ? `“${text.length > 40 ? text.slice(0, 40) + "…" : text}”` : "none";
}

// --- modes ----------------------------------------------------------------------------------------

function setMode(mode) {
  for (const name of ["chat", "complete"]) {
    const on = name === mode;
    $(`${name}-pane`).hidden = !on;
    $(`tab-${name}`).setAttribute("aria-selected", String(on));
    $(`tab-${name}`).classList.toggle("active", on);
  }
  showError("");
  document.body.dataset.mode = mode;
  $("stats").hidden = statsMode !== mode; // each mode's last figures stay with it
  (mode === "chat" ? $("message") : $("prompt")).focus();
}

// The settings a run recommends (quill sft: greedy), and a composer hint that fits the keyboard:
// a touch screen's keyboard has no Shift+Enter to speak of.
function applyPageDefaults() {
  if (page.temperature !== "" && !Number.isNaN(parseFloat(page.temperature))) $("temperature").value = page.temperature;
  if (window.matchMedia("(pointer: coarse)").matches) $("message").placeholder = $("message").dataset.touchPlaceholder;
}

document.addEventListener("DOMContentLoaded", () => {
  const chat = page.chat === "true";
  $("chat-note").hidden = chat;
  $("message").disabled = !chat;
  const cap = parseInt(page.maxTokens, 10);
  if (cap > 0) $("max_tokens").max = cap;
  applyPageDefaults();
  $("tab-chat").addEventListener("click", () => setMode("chat"));
  $("tab-complete").addEventListener("click", () => setMode("complete"));
  $("form").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("chat-stop").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
  });
  $("chat-form").addEventListener("submit", send);
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("message").addEventListener("input", growComposer);
  $("system").addEventListener("input", showSystemState);
  $("regenerate").addEventListener("click", regenerate);
  watchTokens($("out-text"));
  watchTokens($("messages"));
  document.addEventListener("scroll", placeTip, true);
  window.addEventListener("resize", placeTip);
  $("clear").addEventListener("click", clearChat);
  setMode(chat ? "chat" : "complete");
  setRunning(false);
});
