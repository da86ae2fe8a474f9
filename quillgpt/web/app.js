// quill playground: streams POST /v1/completions (Server-Sent Events) into the page.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null; // AbortController of the running request; aborting frees the server's slot

function fmt(x, digits = 4) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

async function loadCard() {
  try {
    const r = await fetch("/v1/model-card");
    const c = await r.json();
    $("model-id").textContent = c.id;
    const m = c.model;
    const rows = [
      ["model", c.id],
      ["parameters", `${(c.parameters / 1e6).toFixed(2)}M (${c.parameters.toLocaleString()})`],
      ["architecture", `${m.kind}: ${plural(m.n_layer, "layer")}, ${plural(m.n_head, "head")}, n_embd ${m.n_embd}`],
      ["context", `${m.block_size} tokens`],
      ["vocabulary", `${m.vocab_size} (${c.tokenizer})`],
      ["dropout / bias", `${m.dropout} / ${m.bias}`],
      ["steps trained", c.losses.step ?? "–"],
      ["train loss", fmt(c.losses.train_loss)],
      ["val loss", fmt(c.losses.val_loss)],
      ["best val loss", fmt(c.losses.best_val_loss)],
      ["data", c.data ?? "–"],
      ["device", c.device],
      ["max tokens", c.limits.max_tokens],
    ];
    const dl = $("card");
    dl.replaceChildren();
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = String(v);
      dl.append(dt, dd);
    }
    $("max_tokens").max = c.limits.max_tokens;
  } catch (e) {
    $("model-id").textContent = "model card unavailable";
  }
}

function numberField(id, parse) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : parse(raw);
}

function request() {
  const body = {
    prompt: $("prompt").value,
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

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
}

function showStats(tokens, started, done) {
  const seconds = (performance.now() - started) / 1000;
  const rate = seconds > 0 ? tokens / seconds : 0;
  $("stats").textContent =
    `${tokens} tokens · ${rate.toFixed(1)} tokens/s · ${seconds.toFixed(2)} s${done ? "" : " …"}`;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const body = request();
  $("out-prompt").textContent = body.prompt;
  $("out-text").textContent = "";
  $("stats").textContent = "waiting…";
  setRunning(true);
  controller = new AbortController();
  const started = performance.now();
  let tokens = 0;
  try {
    const r = await fetch("/v1/completions", {
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
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        if (msg.usage) tokens = msg.usage.completion_tokens; // exact count at the end
        for (const c of msg.choices) {
          if (c.text) {
            $("out-text").textContent += c.text;
            if (!msg.usage) tokens += 1; // one chunk per decoding step while streaming
          }
        }
        showStats(tokens, started, false);
      }
    }
    showStats(tokens, started, true);
  } catch (e) {
    if (e.name === "AbortError") showStats(tokens, started, true);
    else {
      $("stats").textContent = "";
      showError(String(e.message || e));
    }
  } finally {
    controller = null;
    setRunning(false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadCard();
  $("form").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
  });
});
