// The page at `/`: a prompt box, the streamed output, and every prompt and generated token
// shaded by how deep it went through the subsamplers. Plain HTML and JavaScript; it talks to
// /v1/completions with stream and return_tokens. `/?prompt=...&run=1` runs a prompt at load
// (how the page test drives it); the body's data-state becomes "done" when the stream ends.
#include "serve/server.h"

namespace subllm::serve {

const char* const kPageHtml = R"PAGE(<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>subllm</title>
<style>
  body { font-family: sans-serif; margin: 1.5em auto; max-width: 60em; color: #222; }
  textarea { width: 100%; height: 6em; font-family: monospace; font-size: 14px; }
  .controls { margin: .5em 0; display: flex; gap: 1em; flex-wrap: wrap; align-items: center; }
  .controls input { width: 5em; }
  #output { white-space: pre-wrap; font-family: monospace; font-size: 15px; line-height: 1.6;
            border: 1px solid #ccc; padding: .7em; min-height: 4em; }
  #output span { border-radius: 2px; }
  .prompt { font-style: italic; text-decoration: underline dotted #888; }
  .depth-x { background: #f4f4f4; }
  .depth-0 { background: #ffffff; }
  .depth-1 { background: #cfe3fb; }
  .depth-2 { background: #8fbdf2; }
  .depth-3 { background: #4f92de; color: #fff; }
  .depth-4 { background: #2261ad; color: #fff; }
  .legend span { padding: 0 .4em; border: 1px solid #ccc; margin-right: .3em; font-family: monospace; }
  #stats { margin-top: .7em; font-size: 14px; }
  #error { color: #b00; }
</style>
</head>
<body data-state="idle">
<h2>subllm</h2>
<p id="model">model: ...</p>
<textarea id="prompt" placeholder="A prompt to continue (the models are not chat-tuned)"></textarea>
<div class="controls">
  <label>max tokens <input id="max_tokens" type="number" value="64" min="1"></label>
  <label>temperature <input id="temperature" type="number" value="0.8" step="0.1" min="0"></label>
  <label>keep threshold <input id="keep_threshold" type="number" value="" step="0.1" placeholder="model's"></label>
  <button id="run">Generate</button>
  <button id="stop" disabled>Stop</button>
</div>
<div class="legend">depth:
  <span class="depth-0">dropped at the first subsampler</span><span class="depth-1">kept at level 1</span><span class="depth-2">kept at level 2</span><span class="depth-3">level 3</span><span class="depth-x">not run yet</span>
  &nbsp; <span class="prompt">prompt</span>
</div>
<div id="output"></div>
<div id="stats"></div>
<div id="error"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let controller = null;

fetch("/v1/models").then((r) => r.json()).then((m) => {
  const d = m.data[0];
  $("model").textContent = "model: " + d.id + " (" + d.structure + ", context " + d.context + " tokens)";
}).catch(() => {});

function addToken(t, isPrompt) {
  const span = document.createElement("span");
  span.textContent = t.text;
  const depth = t.depth < 0 ? "x" : Math.min(t.depth, 4);
  span.className = "depth-" + depth + (isPrompt ? " prompt" : "");
  span.title = (isPrompt ? "prompt" : "generated") + " token " + t.id +
      (t.depth < 0 ? "" : ", depth " + t.depth);
  span.dataset.depth = t.depth;
  $("output").appendChild(span);
}

function showStats(usage, counts) {
  let s = usage.completion_tokens + " tokens generated after a " + usage.prompt_tokens + "-token prompt";
  if (usage.retention) {
    s += "; retention per subsampler: " + usage.retention.map((r, j) => "level " + (j + 1) + " " +
        (100 * r).toFixed(1) + "%").join(", ");
  }
  s += "; tokens by depth: " + Object.keys(counts).sort().map((d) => d + ": " + counts[d]).join(", ");
  s += "; KV cache " + (usage.kv_cache_bytes / 1024).toFixed(1) + " KiB";
  $("stats").textContent = s;
}

async function run() {
  $("output").textContent = "";
  $("stats").textContent = "";
  $("error").textContent = "";
  document.body.dataset.state = "running";
  $("run").disabled = true;
  $("stop").disabled = false;
  const body = {
    prompt: $("prompt").value, stream: true, return_tokens: true,
    max_tokens: parseInt($("max_tokens").value, 10) || 64,
    temperature: parseFloat($("temperature").value) || 0,
  };
  const kt = $("keep_threshold").value;
  if (kt !== "") body.keep_threshold = parseFloat(kt);
  const counts = {};
  const count = (t) => { if (t.depth >= 0) counts[t.depth] = (counts[t.depth] || 0) + 1; };
  controller = new AbortController();
  try {
    const res = await fetch("/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) {
      const e = await res.json();
      throw new Error(e.error ? e.error.message : res.statusText);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const c = chunk.choices[0];
        for (const t of c.prompt_tokens || []) { addToken(t, true); count(t); }
        for (const t of c.tokens || []) { addToken(t, false); count(t); }
        if (chunk.usage) showStats(chunk.usage, counts);
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") $("error").textContent = "error: " + e.message;
  }
  $("run").disabled = false;
  $("stop").disabled = true;
  document.body.dataset.state = "done";
}

$("run").addEventListener("click", run);
$("stop").addEventListener("click", () => controller && controller.abort());

// /?prompt=...&max_tokens=...&temperature=...&keep_threshold=...&run=1
const params = new URLSearchParams(location.search);
for (const k of ["prompt", "max_tokens", "temperature", "keep_threshold"])
  if (params.has(k)) $(k).value = params.get(k);
if (params.get("run") === "1") run();
</script>
</body>
</html>
)PAGE";

}  // namespace subllm::serve
