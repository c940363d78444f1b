// Unit tests of kvmemo/server/static/kvmemo.js against a fake WebSocket.
// Run: node tests/js/test_client.mjs   (Node >= 20, no packages; exits 1 on failure)

import assert from "node:assert/strict";
import {
  KVMemoClient,
  KVMemoError,
  backoffDelay,
  tokenize,
} from "../../kvmemo/server/static/kvmemo.js";
import {FakeWebSocket, run, settled, tick} from "./harness.mjs";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const lastSocket = () => FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
const FAST = {initialMs: 5, maxMs: 20, factor: 2, jitter: 0};

function makeClient(options = {}) {
  return new KVMemoClient("ws://kv.test/ws", {WebSocketImpl: FakeWebSocket, backoff: FAST, ...options});
}

async function openClient(options) {
  const client = makeClient(options);
  lastSocket().serverOpen();
  await client.ready;
  return client;
}

// ---- tests ----

const tests = [];
const test = (name, fn) => tests.push({name, fn});

test("a single call is sent as a plain object with the subprotocol and an integer id", async () => {
  const client = await openClient();
  const ws = lastSocket();
  assert.equal(ws.protocols, "kvmemo.v1");
  const p = client.call("get", "k");
  await tick();
  assert.equal(ws.sent.length, 1);
  const req = ws.sent[0];
  assert.ok(!Array.isArray(req));
  assert.deepEqual({...req, id: 0}, {jsonrpc: "2.0", id: 0, method: "get", params: ["k"]});
  assert.ok(Number.isInteger(req.id));
  ws.serverSend({jsonrpc: "2.0", id: req.id, result: "v"});
  assert.equal(await p, "v");
});

test("calls made in one turn leave as one batch and resolve by id in any order", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const ps = [client.get("a"), client.set("b", "2"), client.mget("a", "b"), client.incr("n")];
  await tick();
  assert.equal(ws.sent.length, 1);
  const batch = ws.sent[0];
  assert.ok(Array.isArray(batch));
  assert.deepEqual(batch.map((r) => r.method), ["get", "set", "mget", "incr"]);
  const ids = batch.map((r) => r.id);
  assert.equal(new Set(ids).size, ids.length, "ids are unique");
  ws.replyAll((r) => `result-of-${r.method}`, {reverse: true});
  assert.deepEqual(await Promise.all(ps), ["result-of-get", "result-of-set", "result-of-mget", "result-of-incr"]);
});

test("responses split over several messages still find their calls", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const a = client.call("get", "a");
  const b = client.call("get", "b");
  await tick();
  const [ra, rb] = ws.sent[0];
  ws.serverSend({jsonrpc: "2.0", id: rb.id, result: "B"});
  ws.serverSend([{jsonrpc: "2.0", id: ra.id, result: "A"}]);
  assert.deepEqual(await Promise.all([a, b]), ["A", "B"]);
});

test("calls in different turns are different messages and ids never repeat", async () => {
  const client = await openClient();
  const ws = lastSocket();
  client.ping();
  await tick();
  client.ping();
  await tick();
  assert.equal(ws.sent.length, 2);
  assert.ok(ws.sent[1].id > ws.sent[0].id);
});

test("a server error rejects with KVMemoError carrying code, kind and data", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const p = client.call("get");
  await tick();
  const data = {kind: "ARITY"};
  ws.serverSend({jsonrpc: "2.0", id: ws.sent[0].id, error: {code: -32602, message: "wrong number of arguments for 'get'", data}});
  const error = await p.then(() => assert.fail("should reject"), (e) => e);
  assert.ok(error instanceof KVMemoError);
  assert.ok(error instanceof Error);
  assert.equal(error.code, -32602);
  assert.equal(error.kind, "ARITY");
  assert.deepEqual(error.data, data);
  assert.equal(error.message, "wrong number of arguments for 'get'");
});

test("a notification has no id and can share a batch with calls", async () => {
  const client = await openClient();
  const ws = lastSocket();
  client.notify("set", "k", "v");
  const p = client.get("k");
  await tick();
  const [note, req] = ws.sent[0];
  assert.ok(!("id" in note));
  assert.equal(note.method, "set");
  ws.serverSend([{jsonrpc: "2.0", id: req.id, result: "v"}]);
  assert.equal(await p, "v");
});

test("convenience methods build the params of the protocol", async () => {
  const client = await openClient();
  const ws = lastSocket();
  client.set("k", 42, "EX", 10, "NX");
  client.set("k", "v", {px: 1500, xx: true, get: true});
  client.del("a", "b");
  client.mset({a: "1", b: "2"});
  client.mset("x", "1", "y", "2");
  client.expire("k", 5);
  client.ttl("k");
  client.scan("0", {match: "user:*", count: 100});
  client.scan("7");
  client.dbsize();
  client.info("memory");
  client.info();
  client.ping();
  await tick();
  assert.deepEqual(
    ws.sent[0].map((r) => [r.method, ...r.params]),
    [
      ["set", "k", "42", "EX", 10, "NX"],
      ["set", "k", "v", "PX", 1500, "XX", "GET"],
      ["del", "a", "b"],
      ["mset", "a", "1", "b", "2"],
      ["mset", "x", "1", "y", "2"],
      ["expire", "k", 5],
      ["ttl", "k"],
      ["scan", "0", "MATCH", "user:*", "COUNT", 100],
      ["scan", "7"],
      ["dbsize"],
      ["info", "memory"],
      ["info"],
      ["ping"],
    ],
  );
});

test("a key that is not a string or number rejects without sending", async () => {
  const client = await openClient();
  const ws = lastSocket();
  await assert.rejects(client.get({}), TypeError);
  await tick();
  assert.equal(ws.sent.length, 0);
});

test("calls in flight reject DISCONNECTED when the socket dies and are not resent", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const events = [];
  client.addEventListener("close", (ev) => events.push(["close", ev.detail.willReconnect]));
  client.addEventListener("reconnecting", (ev) => events.push(["reconnecting", ev.detail.attempt]));
  client.addEventListener("open", (ev) => events.push(["open", ev.detail.reconnected]));
  const p = client.set("k", "v");
  await tick();
  ws.serverClose(1006);
  const error = await p.then(() => assert.fail("should reject"), (e) => e);
  assert.ok(error instanceof KVMemoError);
  assert.equal(error.kind, "DISCONNECTED");
  assert.equal(error.code, null);
  assert.equal(client.state, "reconnecting");
  await sleep(15);
  const ws2 = lastSocket();
  assert.notEqual(ws2, ws);
  ws2.serverOpen();
  await tick();
  assert.equal(ws2.sent.length, 0, "the lost call is not resent");
  assert.deepEqual(events, [["close", true], ["reconnecting", 1], ["open", true]]);
  assert.equal(client.state, "open");
});

test("calls made while disconnected are queued and sent as one batch after reconnecting", async () => {
  const client = await openClient();
  lastSocket().serverClose(1006);
  const a = client.get("a");
  const b = client.get("b");
  await sleep(15);
  const ws2 = lastSocket();
  assert.equal(client.queued, 2);
  ws2.serverOpen();
  assert.equal(ws2.sent.length, 1);
  assert.equal(ws2.sent[0].length, 2);
  ws2.replyAll((r) => r.params[0].toUpperCase());
  assert.deepEqual(await Promise.all([a, b]), ["A", "B"]);
});

test("a call made in the turn the socket died (not yet sent) waits and is sent later", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const p = client.get("a");
  ws.serverClose(1006); // before the microtask flush
  await sleep(15);
  const ws2 = lastSocket();
  ws2.serverOpen();
  ws2.replyAll(() => "A");
  assert.equal(await p, "A");
  assert.equal(ws.sent.length, 0);
});

test("over queueLimit, calls made while disconnected reject with QUEUE_FULL", async () => {
  const client = await openClient({queueLimit: 2, backoff: {initialMs: 1000, maxMs: 1000, jitter: 0}});
  lastSocket().serverClose(1006);
  const a = settled(client.get("a"));
  const b = settled(client.get("b"));
  const c = client.get("c");
  const error = await c.then(() => assert.fail("should reject"), (e) => e);
  assert.equal(error.kind, "QUEUE_FULL");
  assert.equal(error.code, null);
  assert.throws(() => client.notify("ping"), (e) => e.kind === "QUEUE_FULL");
  await tick();
  assert.equal(a.done || b.done, false);
  await client.close();
  assert.equal(a.error.kind, "CLOSED");
});

test("with a token, auth goes first on every socket and the queue waits for it", async () => {
  const client = makeClient({token: "s3cret"});
  const early = client.get("k");
  const ws = lastSocket();
  ws.serverOpen();
  await tick();
  assert.equal(ws.sent.length, 1);
  assert.equal(ws.sent[0].method, "auth");
  assert.deepEqual(ws.sent[0].params, ["s3cret"]);
  ws.serverSend({jsonrpc: "2.0", id: ws.sent[0].id, result: "OK"});
  await client.ready;
  assert.equal(ws.sent.length, 2);
  assert.equal(ws.sent[1].method, "get");
  ws.serverSend({jsonrpc: "2.0", id: ws.sent[1].id, result: "v"});
  assert.equal(await early, "v");

  ws.serverClose(1006);
  await sleep(15);
  const ws2 = lastSocket();
  ws2.serverOpen();
  assert.equal(ws2.sent[0].method, "auth");
  assert.equal(client.state, "reconnecting", "not open before auth succeeds");
});

test("a NOAUTH reply to auth closes the client and rejects ready", async () => {
  const client = makeClient({token: "wrong"});
  const queued = client.get("k");
  const ws = lastSocket();
  ws.serverOpen();
  ws.serverSend({jsonrpc: "2.0", id: ws.sent[0].id, error: {code: -32001, message: "bad token", data: {kind: "NOAUTH"}}});
  await assert.rejects(client.ready, (e) => e.kind === "NOAUTH" && e.code === -32001);
  await assert.rejects(queued, (e) => e.kind === "NOAUTH");
  assert.equal(client.state, "closed");
  await sleep(30);
  assert.equal(lastSocket(), ws, "no reconnection after a wrong token");
});

test("close() rejects pending calls with CLOSED and stops reconnecting", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const inflight = client.get("a");
  await tick();
  const closedEvents = [];
  client.onclose = (ev) => closedEvents.push(ev.detail);
  const done = client.close();
  await assert.rejects(inflight, (e) => e instanceof KVMemoError && e.kind === "CLOSED" && e.code === null);
  await assert.rejects(client.get("b"), (e) => e.kind === "CLOSED");
  await done;
  assert.equal(client.state, "closed");
  assert.equal(closedEvents.length, 1);
  assert.equal(closedEvents[0].willReconnect, false);
  await sleep(30);
  assert.equal(lastSocket(), ws);
});

test("with reconnect off, a dropped socket closes the client", async () => {
  const client = await openClient({reconnect: false});
  const p = client.get("a");
  await tick();
  lastSocket().serverClose(1006);
  await assert.rejects(p, (e) => e.kind === "DISCONNECTED");
  assert.equal(client.state, "closed");
  await assert.rejects(client.get("b"), (e) => e.kind === "DISCONNECTED");
});

test("a failed first connection is retried and ready resolves later", async () => {
  const client = makeClient();
  let reconnecting = 0;
  client.onreconnecting = () => reconnecting++;
  lastSocket().serverClose(1006); // handshake refused
  await sleep(15);
  lastSocket().serverOpen();
  assert.equal(await client.ready, client);
  assert.equal(reconnecting, 1);
});

test("KVMemoClient.connect resolves with an open client", async () => {
  const pending = KVMemoClient.connect("ws://kv.test/ws", {WebSocketImpl: FakeWebSocket});
  await tick();
  lastSocket().serverOpen();
  const client = await pending;
  assert.equal(client.state, "open");
});

test("a whole-batch error with id null rejects the calls of that batch", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const ps = [client.get("a"), client.get("b")];
  await tick();
  ws.serverSend({jsonrpc: "2.0", id: null, error: {code: -32004, message: "batch too long", data: {kind: "TOO_LARGE"}}});
  for (const p of ps) await assert.rejects(p, (e) => e.kind === "TOO_LARGE" && e.code === -32004);
});

test("maxBatch splits a busy turn into several messages", async () => {
  const client = await openClient({maxBatch: 2});
  const ws = lastSocket();
  for (let i = 0; i < 5; i++) client.get(`k${i}`);
  await tick();
  assert.deepEqual(ws.sent.map((m) => (Array.isArray(m) ? m.length : 1)), [2, 2, 1]);
});

test("backoffDelay grows by factor, is capped at maxMs and jitters within bounds", () => {
  const b = {initialMs: 100, maxMs: 5000, factor: 2, jitter: 0.2};
  assert.deepEqual([1, 2, 3, 4, 5, 6, 7, 10].map((n) => backoffDelay(n, b, () => 0.5)), [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
  assert.equal(backoffDelay(1, b, () => 0), 80);
  assert.equal(backoffDelay(1, b, () => 0.999999), 120);
  assert.ok(backoffDelay(20, b, () => 0.999999) <= 5000);
});

test("tokenize splits on blanks and honours double and single quotes", () => {
  assert.deepEqual(tokenize("SET k v EX 10"), ["SET", "k", "v", "EX", "10"]);
  assert.deepEqual(tokenize('get "a key"'), ["get", "a key"]);
  assert.deepEqual(tokenize("get 'a key'"), ["get", "a key"]);
  assert.deepEqual(tokenize('set k "line\\nnext \\"q\\" \\x41"'), ["set", "k", 'line\nnext "q" A']);
  assert.deepEqual(tokenize("set k 'it\\'s'"), ["set", "k", "it's"]);
  assert.deepEqual(tokenize('set "" x'), ["set", "", "x"]);
  assert.deepEqual(tokenize('  a"b c"d  '), ["ab cd"]);
  assert.deepEqual(tokenize("   "), []);
  assert.throws(() => tokenize('get "open'), SyntaxError);
  assert.throws(() => tokenize("get 'open"), SyntaxError);
});

test("a WebSocket constructor that throws closes the client with CLOSED", async () => {
  FakeWebSocket.throwOnConstruct = new SyntaxError("bad url");
  try {
    const client = makeClient();
    await assert.rejects(client.ready, (e) => e.kind === "CLOSED");
    assert.equal(client.state, "closed");
  } finally {
    FakeWebSocket.throwOnConstruct = null;
  }
});

test("transaction, watch and unwatch send the requests of protocol 1.2", async () => {
  const client = await openClient();
  const ws = lastSocket();
  client.watch("w", 7);
  client.watch(["x", "y"]);
  client.transaction(["set", "k", "v", "EX", 10], ["incr", "n"], ["incrby", "n", 5n], ["ping"]);
  client.transaction();
  client.unwatch();
  await tick();
  assert.equal(ws.sent.length, 1, "ordinary requests: one batch with the rest of the turn");
  assert.deepEqual(
    ws.sent[0].map((r) => [r.method, r.params]),
    [
      ["watch", ["w", "7"]],
      ["watch", ["x", "y"]],
      ["transaction", [["set", "k", "v", "EX", 10], ["incr", "n"], ["incrby", "n", "5"], ["ping"]]],
      ["transaction", []],
      ["unwatch", []],
    ],
  );
  assert.ok(ws.sent[0].every((r) => Number.isInteger(r.id) && r.jsonrpc === "2.0"));
});

test("a transaction result decodes each failed call into a KVMemoError in its slot", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const p = client.transaction(["set", "a", "1"], ["incr", "a"], ["incr", "s"], ["mget", "a", "z"], ["get", "z"]);
  await tick();
  const data = {kind: "NOT_INTEGER"};
  ws.serverSend({
    jsonrpc: "2.0",
    id: ws.sent[0].id,
    result: ["OK", 2, {code: -32000, message: "value is not an integer or out of range", data}, ["2", null], null],
  });
  const [ok, n, error, values, missing, ...rest] = await p;
  assert.deepEqual([ok, n, values, missing, rest], ["OK", 2, ["2", null], null, []]);
  assert.ok(error instanceof KVMemoError);
  assert.equal(error.code, -32000);
  assert.equal(error.kind, "NOT_INTEGER");
  assert.deepEqual(error.data, data);
  assert.equal(error.message, "value is not an integer or out of range");
});

test("a transaction answered null (a watched key changed) resolves to null", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const watched = client.watch("w");
  await tick();
  ws.replyAll(() => "OK");
  assert.equal(await watched, "OK");
  const p = client.transaction(["set", "w", "mine"]);
  await tick();
  ws.replyAll(() => null);
  assert.equal(await p, null);
});

test("a transaction refused as a whole rejects like any call; a non-array result is BAD_RESPONSE", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const refused = client.transaction(["set", "a", "1"], ["get"]);
  const odd = client.transaction(["get", "a"]);
  await tick();
  const [r1, r2] = ws.sent[0];
  const data = {kind: "ARITY", index: 1};
  ws.serverSend([
    {jsonrpc: "2.0", id: r1.id, error: {code: -32602, message: "wrong number of arguments for 'get' command", data}},
    {jsonrpc: "2.0", id: r2.id, result: {code: -32000}},
  ]);
  const error = await refused.then(() => assert.fail("should reject"), (e) => e);
  assert.ok(error instanceof KVMemoError);
  assert.equal(error.code, -32602);
  assert.equal(error.kind, "ARITY");
  assert.deepEqual(error.data, data);
  await assert.rejects(odd, (e) => e instanceof KVMemoError && e.kind === "BAD_RESPONSE" && e.code === null);
});

test("a malformed transaction call rejects with TypeError and nothing is sent", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const bad = [
    [["set", "a", "1"], "incr a"], // not an array
    [[]], // no method
    [["", "a"]], // empty method
    [[42, "a"]], // method not a string
    [["set", "a", {v: 1}]], // an object param
    [["set", "a", ["v"]]], // a nested array param
    [["set", "a", null]],
    [["set", "a", true]],
    [["expire", "a", NaN]],
    [["get", undefined]],
  ];
  for (const calls of bad) {
    await assert.rejects(client.transaction(...calls), TypeError, JSON.stringify(calls));
  }
  await assert.rejects(client.transaction(["get", "a"], ["set", "b", {}]), /transaction call 1 \('set'\): param 2/);
  await assert.rejects(client.watch({}), TypeError);
  await tick();
  assert.equal(ws.sent.length, 0);
});

test("subscribe and psubscribe send their requests and route pushed messages to their callbacks", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const got = [];
  const events = [];
  const errors = [];
  client.addEventListener("message", (ev) => events.push(ev.detail));
  client.onerror = (ev) => errors.push(ev.detail.error);
  const sub = client.subscribe("news", (data, channel, pattern) => got.push(["news-cb", data, channel, pattern]));
  const psub = client.psubscribe(["n*", "x?"], (data, channel, pattern) => got.push(["pat-cb", data, channel, pattern]));
  await tick();
  assert.deepEqual(
    ws.sent[0].map((r) => [r.method, r.params]),
    [
      ["subscribe", ["news"]],
      ["psubscribe", ["n*", "x?"]],
    ],
  );
  const [r1, r2] = ws.sent[0];
  ws.serverSend([
    {jsonrpc: "2.0", id: r1.id, result: [["subscribe", "news", 1]]},
    {jsonrpc: "2.0", id: r2.id, result: [["psubscribe", "n*", 2], ["psubscribe", "x?", 3]]},
  ]);
  assert.deepEqual(await sub, [["subscribe", "news", 1]]);
  assert.deepEqual(await psub, [["psubscribe", "n*", 2], ["psubscribe", "x?", 3]]);
  assert.deepEqual(client.channels, ["news"]);
  assert.deepEqual(client.patterns, ["n*", "x?"]);
  ws.serverSend({jsonrpc: "2.0", method: "message", params: ["news", "hello"]});
  ws.serverSend([{jsonrpc: "2.0", method: "pmessage", params: ["n*", "news", "hello"]}]);
  ws.serverSend({jsonrpc: "2.0", method: "message", params: ["other", "nobody listens"]});
  ws.serverSend({jsonrpc: "2.0", method: "future-push", params: [1]}); // a later version's: ignored
  assert.deepEqual(got, [
    ["news-cb", "hello", "news", null],
    ["pat-cb", "hello", "news", "n*"],
  ]);
  assert.deepEqual(events, [
    {channel: "news", data: "hello", pattern: null},
    {channel: "news", data: "hello", pattern: "n*"},
    {channel: "other", data: "nobody listens", pattern: null},
  ]);
  assert.deepEqual(errors, [], "a notification is not an orphan error");
  ws.serverSend({jsonrpc: "2.0", method: "message", params: ["news"]});
  assert.equal(errors.length, 1);
  assert.equal(errors[0].kind, "BAD_RESPONSE");
});

test("unsubscribe drops the callbacks at once and sends the names; with none, every one", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const got = [];
  client.subscribe(["a", "b", "c"], (data, channel) => got.push(channel));
  client.psubscribe("p*", (data, channel) => got.push(`p:${channel}`));
  await tick();
  ws.replyAll(() => []);
  const one = client.unsubscribe("a");
  const rest = client.unsubscribe();
  const pats = client.punsubscribe();
  assert.deepEqual(client.channels, []);
  assert.deepEqual(client.patterns, []);
  ws.serverSend({jsonrpc: "2.0", method: "message", params: ["b", "late"]});
  assert.deepEqual(got, []);
  await tick();
  assert.deepEqual(
    ws.sent[1].map((r) => [r.method, r.params]),
    [
      ["unsubscribe", ["a"]],
      ["unsubscribe", []],
      ["punsubscribe", []],
    ],
  );
  ws.replyAll((r) => [[r.method, null, 0]]);
  assert.deepEqual(await rest, [["unsubscribe", null, 0]]);
  await one;
  await pats;
});

test("a refused subscribe rejects and forgets its callback; bad arguments reject before sending", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const refused = client.subscribe("news", () => {});
  await tick();
  ws.serverSend({jsonrpc: "2.0", id: ws.sent[0].id, error: {code: -32001, message: "authentication required", data: {kind: "NOAUTH"}}});
  await assert.rejects(refused, (e) => e instanceof KVMemoError && e.kind === "NOAUTH");
  assert.deepEqual(client.channels, []);
  await assert.rejects(client.subscribe([], () => {}), TypeError);
  await assert.rejects(client.subscribe("news"), TypeError);
  await assert.rejects(client.psubscribe({}, () => {}), TypeError);
  await tick();
  assert.equal(ws.sent.length, 1);
});

test("a refused second subscribe to a channel keeps the first callback", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const got = [];
  const first = client.subscribe("news", (data) => got.push(`first:${data}`));
  await tick();
  ws.serverSend({jsonrpc: "2.0", id: ws.sent[0].id, result: [["subscribe", "news", 1]]});
  await first;
  const second = client.subscribe("news", (data) => got.push(`second:${data}`));
  await tick();
  ws.serverSend({jsonrpc: "2.0", id: ws.sent[1].id, error: {code: -32004, message: "too many", data: {kind: "TOO_LARGE"}}});
  await assert.rejects(second, (e) => e instanceof KVMemoError && e.kind === "TOO_LARGE");
  ws.serverSend({jsonrpc: "2.0", method: "message", params: ["news", "m"]});
  assert.deepEqual(got, ["first:m"]);
  assert.deepEqual(client.channels, ["news"]);
});

test("after a reconnection the new session subscribes again to every channel and pattern", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const got = [];
  client.subscribe(["a", "b"], (data) => got.push(data));
  client.psubscribe("p*", (data) => got.push(`p:${data}`));
  await tick();
  ws.replyAll(() => []);
  ws.serverClose(1008, "pub/sub output buffer limit reached");
  await sleep(15);
  const ws2 = lastSocket();
  ws2.serverOpen();
  await tick();
  assert.deepEqual(
    ws2.sent.flat().map((r) => [r.method, r.params]),
    [
      ["subscribe", ["a", "b"]],
      ["psubscribe", ["p*"]],
    ],
  );
  ws2.replyAll(() => []);
  ws2.serverSend({jsonrpc: "2.0", method: "message", params: ["a", "again"]});
  assert.deepEqual(got, ["again"]);
});

test("publish sends its channel and message", async () => {
  const client = await openClient();
  const ws = lastSocket();
  const p = client.publish("news", 42);
  await tick();
  assert.deepEqual([ws.sent[0].method, ws.sent[0].params], ["publish", ["news", "42"]]);
  ws.replyAll(() => 3);
  assert.equal(await p, 3);
});

// ---- runner ----

await run(tests, 2000); // ms: a test that hangs (a promise never settled) fails
