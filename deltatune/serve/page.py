"""The web page at ``/``: plain HTML and a little JavaScript, served by the same app (no build step).

The page picks what to do with an adapter by the endpoints its task kind answers (``ENDPOINTS``,
written into the page from :mod:`deltatune.tasks.kinds`), never by the kind's name.
"""
import json

from ..tasks.kinds import KINDS

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>deltatune serve</title>
<style>
 body { font: 15px/1.4 system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }
 table { border-collapse: collapse; margin: .5em 0 1.5em; }
 td, th { border-bottom: 1px solid #ddd; padding: .25em .8em; text-align: left; }
 textarea { width: 100%; height: 7em; font: 13px monospace; }
 pre { background: #f6f6f6; padding: .6em; overflow-x: auto; white-space: pre-wrap; }
 .hit { margin: .8em 0; } .score { color: #777; } #error { color: #b00; }
 #sampling label { margin-right: 1em; } #sampling input { width: 5em; } #sampling #stop { width: 8em; }
</style>
</head>
<body>
<h1>deltatune serve</h1>
<p id="model"></p>
<h2>Adapters</h2>
<table id="adapters"><thead><tr><th>name</th><th>kind</th><th>method</th><th>size</th><th>parameters</th><th>requests</th><th>rows</th><th>index</th></tr></thead><tbody></tbody></table>
<h2>Try one</h2>
<p><label>adapter <select id="adapter"></select></label> <span id="hint"></span></p>
<textarea id="input" placeholder="a query, or paste code"></textarea>
<p id="sampling" hidden><label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0"></label>
<label>top p <input id="top_p" type="number" min="0.01" max="1" step="0.05" value="1"></label>
<label>max tokens <input id="max_tokens" type="number" min="1" max="1024" value="64"></label>
<label>seed <input id="seed" type="number" min="0" placeholder="random"></label>
<label>stop <input id="stop" type="text" placeholder="none"></label></p>
<p><button id="go">Run</button></p>
<p id="error"></p>
<div id="output"></div>
<script>
const $ = (id) => document.getElementById(id);
const ENDPOINTS = __ENDPOINTS__;  // task kind -> the endpoints that answer its adapters
function answers(a, endpoint) { return (ENDPOINTS[a.kind] || []).includes(endpoint); }
let adapters = [];
function kb(n) { return n < 1e6 ? (n / 1024).toFixed(1) + " KB" : (n / 1048576).toFixed(2) + " MB"; }
function cell(row, text) { const td = document.createElement("td"); td.textContent = text; row.appendChild(td); }
async function refresh() {
  const r = await fetch("/v1/adapters");
  const data = await r.json();
  adapters = data.adapters;
  $("model").textContent = "model: " + data.model;
  const body = document.querySelector("#adapters tbody");
  body.innerHTML = "";
  const sel = $("adapter"), keep = sel.value;
  sel.innerHTML = "";
  for (const a of adapters) {
    const row = document.createElement("tr");
    for (const t of [a.name, a.kind, a.method, kb(a.size_bytes), a.parameters.toLocaleString("en"), a.requests, a.rows,
                     a.indexed ? a.indexed.functions + " functions" : "-"]) cell(row, t);
    body.appendChild(row);
    const opt = document.createElement("option");
    opt.value = a.name; opt.textContent = a.name + " (" + a.kind + ")";
    sel.appendChild(opt);
  }
  if (keep) sel.value = keep;
  hint();
}
function current() { return adapters.find((a) => a.name === $("adapter").value); }
function hint() {
  const a = current();
  $("hint").textContent = !a ? "" : answers(a, "search") && a.indexed ? "search the indexed code"
    : answers(a, "embed") ? "embed (no index yet)" : answers(a, "classify") ? "classify" : "generate";
  $("sampling").hidden = !a || !answers(a, "generate");
}
function sampling() {  // the OpenAI sampling parameters of the generation view
  const out = {max_tokens: Number($("max_tokens").value) || 64, temperature: Number($("temperature").value),
               top_p: Number($("top_p").value) || 1};
  if ($("seed").value !== "") out.seed = Number($("seed").value);
  if ($("stop").value) out.stop = [$("stop").value];
  return out;
}
async function post(url, body) {
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  if (!r.ok) {
    const e = await r.json().catch(() => ({detail: r.statusText}));
    throw new Error(r.status + ": " + (e.detail || (e.error && e.error.message)));
  }
  return r;
}
async function go() {
  const a = current(), text = $("input").value, out = $("output");
  $("error").textContent = ""; out.innerHTML = "";
  if (!a) { $("error").textContent = "no adapter loaded"; return; }
  const base = "/v1/adapters/" + encodeURIComponent(a.name);
  try {
    if (answers(a, "search") && a.indexed) {
      const data = await (await post(base + "/search", {query: text, k: 5})).json();
      for (const hit of data.results) {
        const div = document.createElement("div"); div.className = "hit result";
        const head = document.createElement("div");
        head.textContent = hit.name + " \\u2014 " + hit.file + ":" + hit.line + " ";
        const s = document.createElement("span"); s.className = "score"; s.textContent = hit.score.toFixed(3);
        head.appendChild(s);
        const pre = document.createElement("pre"); pre.textContent = hit.code;
        div.appendChild(head); div.appendChild(pre); out.appendChild(div);
      }
    } else if (answers(a, "embed")) {
      const data = await (await post(base + "/embed", {text: text})).json();
      const v = data.embeddings[0];
      const pre = document.createElement("pre"); pre.className = "result";
      pre.textContent = "embedding (" + v.length + " dims): " + v.slice(0, 8).map((x) => x.toFixed(4)).join(", ") + ", ...";
      out.appendChild(pre);
    } else if (answers(a, "classify")) {
      const data = await (await post(base + "/classify", {text: text})).json();
      const r = data.results[0];
      const p = document.createElement("p"); p.className = "result";
      p.textContent = "class " + r.label + " (p = " + r.probabilities[r.index].toFixed(3) + ")"
        + (data.labels ? "" : " \u2014 " + data.note);
      out.appendChild(p);
    } else {
      const pre = document.createElement("pre"); pre.className = "result"; out.appendChild(pre);
      // the OpenAI chat endpoint, streamed: server-sent events, one "data: {chunk}" each, "data: [DONE]" last
      const r = await post("/v1/chat/completions", {model: a.name, messages: [{role: "user", content: text}],
                                                    stream: true, ...sampling()});
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += dec.decode(value, {stream: true});
        let end;
        while ((end = buf.indexOf("\\n\\n")) >= 0) {
          const data = buf.slice(0, end).replace(/^data: /, ""); buf = buf.slice(end + 2);
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) $("error").textContent = msg.error.message;
          const delta = msg.choices && msg.choices[0] && msg.choices[0].delta;
          if (delta && delta.content) pre.textContent += delta.content;
        }
      }
    }
  } catch (e) { $("error").textContent = e.message; }
  refresh();
}
$("go").addEventListener("click", go);
$("adapter").addEventListener("change", hint);
refresh();
</script>
</body>
</html>
"""
PAGE = PAGE.replace("__ENDPOINTS__", json.dumps({name: list(kind.endpoints) for name, kind in KINDS.items()}))
