// quill playground: a chat with the model (POST /v1/chat/completions) or a completion of a text
// (POST /v1/completions), both streamed as Server-Sent Events. No build step, no outside requests.
"use strict";

const $ = (id) => document.getElementById(id);
const page = document.body.dataset;
let controller = null; // AbortController of the running request; aborting frees the server's slot
let history = []; // the conversation: {role, content}, system prompt not included

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
// Text is handed to onText at most once per frame, however fast the model writes: the page
// stays responsive (and Stop clickable) while a small model streams thousands of tokens a second.
async function run(url, body, onText, onFinish) {
  showError("");
  $("stats").textContent = "waiting…";
  setRunning(true);
  const started = performance.now();
  let tokens = 0;
  let finish = null;
  let pending = "";
  let frame = 0;
  const flush = () => {
    if (frame) cancelAnimationFrame(frame);
    frame = 0;
    if (pending) onText(pending);
    pending = "";
  };
  try {
    await stream(url, body, (msg) => {
      if (msg.usage) tokens = msg.usage.completion_tokens; // exact count at the end
      for (const c of msg.choices) {
        const text = c.delta ? c.delta.content : c.text;
        if (text) {
          pending += text;
          if (!msg.usage) tokens += 1; // one chunk per decoding step while streaming
        }
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
    controller = null;
    setRunning(false);
    if (onFinish) onFinish();
  }
}

// --- complete mode --------------------------------------------------------------------------------

async function generate(event) {
  event.preventDefault();
  const body = { prompt: $("prompt").value, ...sampling() };
  $("out-prompt").textContent = body.prompt;
  $("out-text").textContent = "";
  const out = $("out-text");
  await run("/v1/completions", body, (text) => { out.append(text); });
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
  const result = await run("/v1/chat/completions", { messages, ...sampling() }, (piece) => {
    text.append(piece);
    li.classList.remove("pending");
    scrollToEnd();
  });
  li.classList.remove("pending");
  if (!result.ok) {
    li.remove();
    return false;
  }
  if (result.finish === "length" || result.finish === "stopped") li.classList.add("cut");
  history.push({ role: "assistant", content: text.textContent });
  updateChatButtons();
  return true;
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
  renderMessages();
  await reply();
}

function clearChat() {
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
  (mode === "chat" ? $("message") : $("prompt")).focus();
}

document.addEventListener("DOMContentLoaded", () => {
  const chat = page.chat === "true";
  $("chat-note").hidden = chat;
  $("message").disabled = !chat;
  const cap = parseInt(page.maxTokens, 10);
  if (cap > 0) $("max_tokens").max = cap;
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
  $("clear").addEventListener("click", clearChat);
  setMode(chat ? "chat" : "complete");
  setRunning(false);
});
