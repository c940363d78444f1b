/**
 * console.js — the KVMemo web console served at "/".
 *
 * Three panels over one KVMemoClient connected to ws(s)://<this host>/ws:
 *   - Commands: a Redis-like command line (tokenized as redis-cli does) whose
 *     first word, lower-cased, is the method and whose other words are sent
 *     as string params; every result or error is appended to #output, and so
 *     is every message of what was SUBSCRIBEd (or PSUBSCRIBEd) there, also
 *     after a reconnection (the client subscribes again).
 *   - Keys: a full SCAN (COUNT 100, capped at MAX_KEYS keys) listed in #keys;
 *     clicking a key shows its value (GET) and TTL.
 *   - Metrics: INFO (and DBSIZE, in the same batch) every second while
 *     connected. Every field is read defensively: missing means "n/a".
 *
 * The status badge shows the client's state: "connected", "reconnecting",
 * "idle" or "disconnected". Idle: the server (started with an --idle-timeout
 * shorter than the metrics period) closed the unused session; the page then
 * polls nothing and opens no socket until the next command or key click,
 * which reconnects (see "Idle close" in kvmemo.js).
 *
 * A token can be given in the page's query string (/?token=...), or typed as
 * `AUTH token`; it is then sent with `auth` on every connection. AUTH lines
 * are kept out of the command history.
 */

import {KVMemoClient, tokenize} from "/static/kvmemo.js";

const METRICS_INTERVAL_MS = 1000; // how often INFO is polled while connected
const SCAN_COUNT = 100; // COUNT hint per SCAN step
const MAX_KEYS = 10000; // keys listed at most; a bigger keyspace is truncated
const MAX_SCAN_STEPS = 10000; // SCAN calls per listing at most (guards a cursor that never ends)
const MAX_OUTPUT_ENTRIES = 500; // older entries are dropped from #output
const MAX_HISTORY = 200; // command lines remembered
const HISTORY_KEY = "kvmemo.console.history"; // localStorage key

const $ = (id) => document.getElementById(id);

const dom = {
  status: $("status"),
  serverUrl: $("server-url"),
  output: $("output"),
  form: $("command-form"),
  input: $("command-input"),
  clear: $("clear-output"),
  scanForm: $("scan-form"),
  scanButton: $("scan-button"),
  scanMatch: $("scan-match"),
  scanStatus: $("scan-status"),
  keys: $("keys"),
  keyName: $("key-name"),
  keyTtl: $("key-ttl"),
  keyValue: $("key-value"),
  metrics: $("metrics"),
  metricsUpdated: $("metrics-updated"),
  metricKeys: $("metric-keys"),
  metricMemory: $("metric-memory"),
  metricMemoryBar: $("metric-memory-bar"),
  metricOps: $("metric-ops"),
  metricActors: $("metric-actors"),
  metricServer: $("metric-server"),
  metricPersistence: $("metric-persistence"),
};

// ---- connection ----

const wsUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
const token = new URLSearchParams(location.search).get("token");
const client = new KVMemoClient(wsUrl, {token: token || null});
dom.serverUrl.textContent = wsUrl;

function showStatus() {
  const text = {open: "connected", reconnecting: "reconnecting", idle: "idle"}[client.state] ?? "disconnected";
  dom.status.textContent = text;
  dom.status.dataset.state = text;
  dom.status.title =
    client.state === "idle"
      ? "idle: the server closed the unused connection; the next command reconnects"
      : `client state: ${client.state}`;
}

client.addEventListener("open", () => {
  showStatus();
  refreshMetrics();
});
client.addEventListener("close", () => {
  showStatus();
  dom.metrics.classList.add("stale");
});
client.addEventListener("reconnecting", (ev) => {
  showStatus();
  dom.status.title = `reconnecting: attempt ${ev.detail.attempt} in ${ev.detail.delayMs} ms`;
});
client.addEventListener("error", (ev) => {
  console.warn("KVMemo:", ev.detail.error);
  showStatus();
});
// Published messages (after SUBSCRIBE / PSUBSCRIBE typed below) show in the output too.
client.addEventListener("message", (ev) => {
  const {channel, data, pattern} = ev.detail;
  const head = pattern === null ? `message ${channel}` : `pmessage ${pattern} ${channel}`;
  appendNode(
    el("div", {className: "push"}, [
      el("div", {className: "push-head", text: `« ${head}`}),
      el("pre", {className: "push-data", text: data}),
    ]),
  );
});
client.ready.catch((error) => {
  showStatus();
  appendEntry("(connect)").fail(error);
});
showStatus();

// ---- helpers ----

function el(tag, {className, text, attrs} = {}, children = []) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  if (attrs) for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}

function errorText(error) {
  if (error && typeof error === "object") {
    const kind = error.kind ?? error.name ?? "ERROR";
    const code = error.code !== undefined && error.code !== null ? ` (${error.code})` : "";
    return `${kind}${code}: ${error.message}`;
  }
  return String(error);
}

function asNumber(x) {
  if (typeof x === "number" && Number.isFinite(x)) return x;
  if (typeof x === "string" && x.trim() !== "" && Number.isFinite(Number(x))) return Number(x);
  return null;
}

function formatBytes(x) {
  const n = asNumber(x);
  if (n === null) return "n/a";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

function formatValue(x) {
  if (x === undefined || x === null) return "n/a";
  if (typeof x === "number") return String(x);
  if (typeof x === "string") return x;
  return JSON.stringify(x);
}

function isObject(x) {
  return x !== null && typeof x === "object" && !Array.isArray(x);
}

// ---- command line ----

/** Appends `node` to the output, keeping it scrolled to the end if it was; tells if it was. */
function appendNode(node) {
  const stick = dom.output.scrollTop + dom.output.clientHeight >= dom.output.scrollHeight - 8;
  dom.output.append(node);
  while (dom.output.childElementCount > MAX_OUTPUT_ENTRIES) dom.output.firstElementChild.remove();
  if (stick) dom.output.scrollTop = dom.output.scrollHeight;
  return stick;
}

/** Appends an entry for `line` and returns handles to complete it. */
function appendEntry(line) {
  const result = el("pre", {className: "entry-result", text: "…"});
  const entry = el("div", {className: "entry pending"}, [
    el("div", {className: "entry-command"}, [el("span", {className: "prompt", text: "> "}), line]),
    result,
  ]);
  const stick = appendNode(entry);
  const started = performance.now();
  const done = () => {
    entry.classList.remove("pending");
    entry.title = `${Math.round(performance.now() - started)} ms`;
    if (stick) dom.output.scrollTop = dom.output.scrollHeight;
  };
  return {
    ok(value) {
      result.textContent = JSON.stringify(value, null, 2) ?? "null";
      done();
    },
    fail(error) {
      entry.classList.add("error");
      result.textContent = errorText(error);
      done();
    },
  };
}

async function runLine(line) {
  let words;
  try {
    words = tokenize(line);
  } catch (error) {
    appendEntry(line).fail(error);
    return;
  }
  if (words.length === 0) return;
  const [name, ...params] = words;
  const entry = appendEntry(line);
  try {
    entry.ok(await runMethod(name.toLowerCase(), params));
  } catch (error) {
    entry.fail(error);
  }
}

// SUBSCRIBE and PSUBSCRIBE go through the client's own methods, so that it
// subscribes again after a reconnection (the messages show through its
// "message" event, below); UNSUBSCRIBE and PUNSUBSCRIBE too, so that it then
// forgets them. Without a name SUBSCRIBE goes as typed: the server says why not.
function runMethod(method, params) {
  // AUTH too: the client then authenticates its later connections with that token.
  if (method === "auth" && params.length === 1) return client.auth(params[0]);
  if ((method === "subscribe" || method === "psubscribe") && params.length > 0) {
    return client[method](params, () => {});
  }
  if (method === "unsubscribe" || method === "punsubscribe") return client[method](...params);
  return client.call(method, ...params);
}

// History: index === history.length means "the line being typed" (kept in draft).
const history = loadHistory();
let historyIndex = history.length;
let draft = "";

function loadHistory() {
  try {
    const saved = JSON.parse(localStorage.getItem(HISTORY_KEY) ?? "[]");
    return Array.isArray(saved) ? saved.filter((x) => typeof x === "string").slice(-MAX_HISTORY) : [];
  } catch {
    return []; // storage disabled or corrupt: start empty
  }
}

// A line holding a secret is not kept in the history (localStorage outlives the
// page), as redis-cli keeps no AUTH in its history file.
function isSecret(line) {
  try {
    return tokenize(line)[0]?.toLowerCase() === "auth";
  } catch {
    return /^\s*["']?auth\b/i.test(line); // unterminated quote: judged by its start
  }
}

function remember(line) {
  if (isSecret(line)) {
    historyIndex = history.length;
    draft = "";
    return;
  }
  if (history[history.length - 1] !== line) history.push(line);
  if (history.length > MAX_HISTORY) history.splice(0, history.length - MAX_HISTORY);
  historyIndex = history.length;
  draft = "";
  try {
    localStorage.setItem(HISTORY_KEY, JSON.stringify(history));
  } catch {
    // storage full or disabled: history lives for this page only
  }
}

dom.form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const line = dom.input.value;
  if (line.trim() === "") return;
  remember(line);
  dom.input.value = "";
  runLine(line);
});

dom.input.addEventListener("keydown", (ev) => {
  if (ev.key !== "ArrowUp" && ev.key !== "ArrowDown") return;
  if (history.length === 0) return;
  ev.preventDefault();
  if (historyIndex === history.length) draft = dom.input.value;
  historyIndex = ev.key === "ArrowUp" ? Math.max(0, historyIndex - 1) : Math.min(history.length, historyIndex + 1);
  dom.input.value = historyIndex === history.length ? draft : history[historyIndex];
  const end = dom.input.value.length;
  dom.input.setSelectionRange(end, end);
});

dom.clear.addEventListener("click", () => {
  dom.output.replaceChildren();
  dom.input.focus();
});

// ---- key browser ----

let scanning = false;
let selectedKey = null;

async function scanKeys() {
  if (scanning) return;
  scanning = true;
  dom.scanButton.disabled = true;
  const match = dom.scanMatch.value.trim();
  dom.scanStatus.textContent = "scanning…";
  const found = new Set();
  let cursor = "0";
  let steps = 0;
  let truncated = false;
  try {
    do {
      const reply = await client.scan(cursor, {match: match || undefined, count: SCAN_COUNT});
      if (!Array.isArray(reply) || reply.length !== 2 || !Array.isArray(reply[1])) {
        throw new Error(`unexpected SCAN reply: ${JSON.stringify(reply)}`);
      }
      cursor = String(reply[0]);
      for (const key of reply[1]) found.add(String(key));
      steps++;
      if (cursor !== "0" && (found.size >= MAX_KEYS || steps >= MAX_SCAN_STEPS)) {
        truncated = true;
        break;
      }
    } while (cursor !== "0");
    const keys = [...found].sort().slice(0, MAX_KEYS);
    renderKeys(keys);
    dom.scanStatus.textContent =
      `${keys.length.toLocaleString()} key${keys.length === 1 ? "" : "s"}` +
      (match ? ` matching ${match}` : "") +
      (truncated || found.size > MAX_KEYS ? ` (stopped at ${MAX_KEYS.toLocaleString()})` : "");
    dom.scanStatus.classList.remove("error-text");
  } catch (error) {
    dom.scanStatus.textContent = errorText(error);
    dom.scanStatus.classList.add("error-text");
  } finally {
    scanning = false;
    dom.scanButton.disabled = false;
  }
}

function renderKeys(keys) {
  const items = keys.map((key) => {
    const li = el("li", {text: key, attrs: {tabindex: "0", role: "button", title: `GET ${key}`}});
    li.dataset.key = key;
    if (key === selectedKey) li.classList.add("selected");
    return li;
  });
  dom.keys.replaceChildren(...items);
}

async function showKey(key) {
  selectedKey = key;
  for (const li of dom.keys.children) li.classList.toggle("selected", li.dataset.key === key);
  dom.keyName.textContent = key;
  dom.keyTtl.textContent = "";
  dom.keyValue.textContent = "…";
  dom.keyValue.classList.remove("error-text", "nil");
  // Made in the same turn, GET and TTL leave as one batch.
  const [value, ttl] = await Promise.allSettled([client.get(key), client.ttl(key)]);
  if (selectedKey !== key) return; // another key was clicked meanwhile
  if (value.status === "rejected") {
    dom.keyValue.textContent = errorText(value.reason);
    dom.keyValue.classList.add("error-text");
  } else if (value.value === null) {
    dom.keyValue.textContent = "(nil)";
    dom.keyValue.classList.add("nil");
  } else {
    dom.keyValue.textContent = typeof value.value === "string" ? value.value : JSON.stringify(value.value);
  }
  if (ttl.status === "fulfilled") {
    const t = ttl.value;
    dom.keyTtl.textContent = t === -1 ? "no expiry" : t === -2 ? "no such key" : `TTL ${t} s`;
  }
}

dom.scanButton.addEventListener("click", scanKeys);
dom.scanForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  scanKeys();
});
dom.keys.addEventListener("click", (ev) => {
  const li = ev.target.closest("li");
  if (li && dom.keys.contains(li)) showKey(li.dataset.key ?? li.textContent);
});
dom.keys.addEventListener("keydown", (ev) => {
  if (ev.key !== "Enter" && ev.key !== " ") return;
  const li = ev.target.closest("li");
  if (!li) return;
  ev.preventDefault();
  showKey(li.dataset.key ?? li.textContent);
});

// ---- metrics ----

let metricsBusy = false;

async function refreshMetrics() {
  if (metricsBusy || client.state !== "open") return;
  metricsBusy = true;
  try {
    // Same turn: INFO and DBSIZE travel in one batch.
    const [info, dbsize] = await Promise.allSettled([client.info(), client.dbsize()]);
    if (info.status === "rejected" && dbsize.status === "rejected") throw info.reason;
    renderMetrics(info.status === "fulfilled" && isObject(info.value) ? info.value : {}, dbsize.status === "fulfilled" ? dbsize.value : undefined);
    dom.metrics.classList.remove("stale");
    dom.metricsUpdated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    dom.metricsUpdated.classList.remove("error-text");
  } catch (error) {
    dom.metrics.classList.add("stale");
    dom.metricsUpdated.textContent = errorText(error);
    dom.metricsUpdated.classList.add("error-text");
  } finally {
    metricsBusy = false;
  }
}

function renderMetrics(info, dbsize) {
  const section = (name) => (isObject(info[name]) ? info[name] : null);
  const keyspace = section("keyspace");
  const memory = section("memory");

  const keys = keyspace?.keys ?? dbsize;
  dom.metricKeys.textContent = formatValue(asNumber(keys) ?? keys);

  const used = asNumber(memory?.used_memory);
  const max = asNumber(memory?.maxmemory);
  const maxText = max === 0 ? "no limit" : formatBytes(max);
  const share = used !== null && max !== null && max > 0 ? Math.min(1, used / max) : null;
  dom.metricMemory.textContent =
    `${formatBytes(used)} / ${maxText}` + (share !== null ? ` (${(share * 100).toFixed(1)} %)` : "");
  dom.metricMemoryBar.style.width = share !== null ? `${(share * 100).toFixed(1)}%` : "0";
  dom.metricMemoryBar.dataset.level = share === null ? "none" : share >= 0.9 ? "high" : share >= 0.7 ? "mid" : "low";

  renderPairs(dom.metricOps, section("stats"), "stats");
  renderPairs(dom.metricServer, section("server"), "server");
  renderPairs(dom.metricPersistence, section("persistence"), "persistence");
  renderActors(Array.isArray(info.actors) ? info.actors : null);
}

// "<section>/<field>" of the nested values whose <details> the user opened,
// so that the once-a-second re-render keeps them open.
const openNested = new Set();

function renderPairs(target, object, label) {
  if (object === null || Object.keys(object).length === 0) {
    target.replaceChildren(el("dt", {text: label}), el("dd", {text: "n/a"}));
    return;
  }
  const nodes = [];
  for (const [name, value] of Object.entries(object)) {
    const dd = el("dd");
    if (value !== null && typeof value === "object") {
      // A nested value (INFO stats carries the whole metrics registry, say) is
      // folded away: as one line of JSON it would flood the panel.
      const key = `${label}/${name}`;
      const size = Array.isArray(value) ? value.length : Object.keys(value).length;
      const unit = Array.isArray(value) ? "item" : "field";
      const details = el("details", {className: "nested"}, [
        el("summary", {text: `${size} ${unit}${size === 1 ? "" : "s"}`}),
        el("pre", {text: JSON.stringify(value, null, 2)}),
      ]);
      details.open = openNested.has(key);
      details.addEventListener("toggle", () => {
        if (details.open) openNested.add(key);
        else openNested.delete(key);
      });
      dd.append(details);
    } else {
      dd.textContent = formatValue(value);
    }
    nodes.push(el("dt", {text: name}), dd);
  }
  target.replaceChildren(...nodes);
}

function renderActors(actors) {
  if (actors === null) {
    dom.metricActors.textContent = "n/a";
    return;
  }
  if (actors.length === 0) {
    dom.metricActors.textContent = "no actors";
    return;
  }
  const head = el("thead", {}, [
    el("tr", {}, ["name", "state", "restarts", "mailbox"].map((h) => el("th", {text: h, attrs: {scope: "col"}}))),
  ]);
  const rows = actors.map((actor) => {
    const a = isObject(actor) ? actor : {};
    const state = typeof a.state === "string" ? a.state : null;
    const stateCell = el("td", {}, [
      el("span", {className: "actor-state", text: state ?? "n/a", attrs: {"data-state": (state ?? "unknown").toLowerCase()}}),
    ]);
    return el("tr", {}, [
      el("td", {text: formatValue(a.name)}),
      stateCell,
      el("td", {className: "num", text: formatValue(a.restarts)}),
      el("td", {className: "num", text: formatValue(a.mailbox)}),
    ]);
  });
  dom.metricActors.replaceChildren(el("table", {}, [head, el("tbody", {}, rows)]));
}

setInterval(refreshMetrics, METRICS_INTERVAL_MS);
