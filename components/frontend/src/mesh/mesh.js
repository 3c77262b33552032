// The mesh page's script: polls /api/mesh once a second and redraws.
// Every value from the server is put in the page as text (textContent),
// never as HTML: request ids come from clients and errors from workers.
"use strict";

const POLL_MS = 1000;
// A poll that takes longer than this is abandoned (nothing waits for ever).
const POLL_TIMEOUT_MS = 3000;
// Load samples kept for the chart: 5 minutes at one a second (as the server).
const HISTORY = 300;
const KEY_STORAGE = "switchyard-api-key";
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

// The server's load samples ({at_ms, loads: {id: load}}), oldest first,
// fetched a few at a time (only those newer than the last one we have).
let samples = [];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}

function percent(x) {
  return x == null ? "–" : (100 * x).toFixed(x < 0.1 ? 1 : 0) + " %";
}

function time(ms) {
  return new Date(ms).toLocaleTimeString();
}

function setStatus(text, kind) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = "status " + kind;
}

// One round: fetch, then draw. Drawing is outside the fetch's error
// handling on purpose: a bug in it must surface as an uncaught error in the
// console (the browser test fails on one), not pass for a network problem.
async function poll() {
  try {
    const mesh = await load();
    if (mesh) {
      render(mesh);
      setStatus("live · " + time(mesh.at_ms), "live");
    }
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// The mesh and the new load samples, or null (the status says why).
async function load() {
  const headers = {};
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = "Bearer " + key;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), POLL_TIMEOUT_MS);
  try {
    const response = await fetch("api/mesh", { headers, signal: abort.signal, cache: "no-store" });
    if (response.status === 401) {
      document.getElementById("key-form").hidden = false;
      setStatus(key ? "the API key was refused" : "an API key is needed", "error");
      return null;
    }
    if (!response.ok) {
      setStatus("/api/mesh answered " + response.status, "error");
      return null;
    }
    const mesh = await response.json();
    document.getElementById("key-form").hidden = true;
    await fetchHistory(headers, abort.signal);
    return mesh;
  } catch (error) {
    setStatus("frontend unreachable (" + error.name + ")", "error");
    return null;
  } finally {
    clearTimeout(timer);
  }
}

async function fetchHistory(headers, signal) {
  const last = samples.length ? "?since=" + samples[samples.length - 1].at_ms : "";
  const response = await fetch("api/mesh/history" + last, { headers, signal, cache: "no-store" });
  if (!response.ok) return;
  samples = samples.concat((await response.json()).samples).slice(-HISTORY);
}

function render(mesh) {
  renderFacts(mesh);
  renderModels(mesh.models);
  renderChart();
  renderDecisions(mesh.decisions);
}

function renderFacts(mesh) {
  const f = mesh.frontend;
  const facts = [
    ["frontend", f.instance_id],
    ["router", f.router_mode],
    ["discovery", f.discovery],
    ["request plane", f.request_plane],
    ["event plane", f.event_plane],
    ["up", Math.round(f.uptime_seconds) + " s"],
    ["event gaps", f.event_gaps],
    ["event disconnects", f.event_disconnects],
    ["ejections", f.router_ejections],
    ["retries", f.router_retries],
  ];
  const kv = mesh.kv_events;
  if (kv) {
    facts.push(["KV events", kv.events], ["refused", kv.refused], ["KV gaps", kv.gaps],
      ["replays", kv.replays], ["lost batches", kv.lost_batches],
      ["mean lag", kv.mean_lag_seconds == null ? "–" : (1000 * kv.mean_lag_seconds).toFixed(1) + " ms"]);
  }
  document.getElementById("frontend").replaceChildren(
    ...facts.map(([name, value]) => el("span", {}, el("b", {}, name + ": "), value)));
}

function renderModels(models) {
  const box = document.getElementById("models");
  if (models.length === 0) {
    box.replaceChildren(el("p", { class: "empty" }, "No model yet: no worker has registered one."));
    return;
  }
  box.replaceChildren(...models.map((model) => {
    const rows = model.instances.map((i) => el("tr", { "data-instance": i.id, class: i.ejected ? "ejected" : "" },
      el("td", {}, swatch(i.id), el("code", {}, i.id)),
      el("td", {}, i.request_plane + " " + i.address),
      el("td", {}, i.namespace + "/" + i.component + "/" + i.endpoint),
      el("td", { class: "num" }, i.inflight),
      el("td", { class: "num" }, i.reported_load == null ? "–" : i.reported_load),
      el("td", { class: "num" }, i.kv_blocks == null ? "–" : i.kv_blocks + (i.kv_usage == null ? "" : " (" + percent(i.kv_usage) + ")")),
      el("td", { class: "num" }, percent(i.prefix_hit_rate)),
      el("td", {}, i.ejected ? "ejected " + (i.ejected_for_ms / 1000).toFixed(1) + " s" : (i.kv_excluded ? "load only" : "ok"),
        i.consecutive_failures ? " (" + i.consecutive_failures + " failures)" : ""),
      el("td", { class: "error-text" }, i.last_error ? time(i.last_error.at_ms) + " " + i.last_error.message : "")));
    return el("div", { "data-model": model.name },
      el("h3", {}, model.name, " ", el("small", {}, model.endpoint + " · " + model.router_mode +
        " · " + model.instances.length + " worker(s)" + (model.waiting ? " · " + model.waiting + " waiting" : ""))),
      el("table", {},
        el("thead", {}, el("tr", {}, ...["instance", "address", "endpoint", "in flight", "reported load",
          "KV blocks (usage)", "prefix hits", "state", "last error"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows)));
  }));
}

// A small square of the worker's color. Set through the style object: the
// page's Content-Security-Policy refuses inline style attributes.
function swatch(id) {
  const node = el("span", { class: "swatch" });
  node.style.background = color(id);
  return node;
}

// Colors stay with a worker while it lives: assigned on first sight.
const colorOf = new Map();
function color(id) {
  if (!colorOf.has(id)) colorOf.set(id, COLORS[colorOf.size % COLORS.length]);
  return colorOf.get(id);
}

// One line per worker over the samples' time span (the right edge is the
// newest sample), broken where the worker was absent.
function renderChart() {
  const svg = document.getElementById("load-chart");
  const ns = "http://www.w3.org/2000/svg";
  const width = 800, height = 160, pad = 4;
  const workers = [];
  let max = 1;
  for (const sample of samples) {
    for (const [id, load] of Object.entries(sample.loads)) {
      if (!workers.includes(id)) workers.push(id);
      if (load > max) max = load;
    }
  }
  for (const id of colorOf.keys()) if (!workers.includes(id)) colorOf.delete(id);
  // The span grows with the samples, from half a minute up to all of them.
  const newest = samples.length ? samples[samples.length - 1].at_ms : 0;
  const span = Math.max(30000, newest - (samples.length ? samples[0].at_ms : 0));
  const x = (at) => width - ((newest - at) / span) * width;
  const y = (load) => height - pad - (load / max) * (height - 2 * pad);
  const lines = workers.map((id) => {
    let d = "", pen = "M";
    for (const sample of samples) {
      const load = sample.loads[id];
      if (load === undefined) { pen = "M"; continue; }
      d += pen + x(sample.at_ms).toFixed(1) + " " + y(load).toFixed(1) + " ";
      pen = "L";
    }
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", d.trim());
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", color(id));
    path.setAttribute("stroke-width", "2");
    path.setAttribute("vector-effect", "non-scaling-stroke");
    return path;
  });
  // The scale is said in the legend: text inside the stretched SVG would be distorted.
  svg.replaceChildren(...lines);
  document.getElementById("load-legend").replaceChildren(el("span", {}, "last " + Math.round(span / 1000) + " s; top: " + max),
    ...workers.map((id) => el("span", {}, swatch(id), id)));
}

function renderDecisions(decisions) {
  const body = document.querySelector("#decisions tbody");
  if (decisions.length === 0) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: "9", class: "empty" }, "No request routed yet.")));
    return;
  }
  body.replaceChildren(...decisions.map((d) => {
    const r = d.runner_up;
    const runnerUp = !r ? "–" : r.worker + (r.cost != null ? " cost " + r.cost.toFixed(1) + ", overlap " + r.overlap : "")
      + (r.load != null ? " load " + r.load : "");
    return el("tr", { title: d.explanation },
      el("td", {}, time(d.at_ms)),
      el("td", {}, el("code", {}, d.request_id)),
      el("td", {}, d.model),
      el("td", {}, d.mode + (d.index ? " (" + d.index + ")" : "") + (d.migration ? ", moved #" + d.migration : "")),
      el("td", {}, el("code", {}, d.worker)),
      el("td", { class: "num" }, d.overlap == null ? "–" : d.overlap + " / " + d.blocks),
      el("td", { class: "num" }, d.cost == null ? "–" : d.cost.toFixed(1)),
      el("td", { class: "num" }, d.load == null ? "–" : d.load),
      el("td", {}, runnerUp));
  }));
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, document.getElementById("key").value.trim());
  document.getElementById("key").value = "";
});

poll();
