// The browser client and the server's idle close (--idle-timeout): an idle
// client waits for its next call before it opens a new socket.
//
// Run: node tests/js/test_idle_s24.mjs
//        the cases played against a fake WebSocket (no server, no packages);
//      KVMEMO_URL=ws://127.0.0.1:PORT/ws KVMEMO_AUTH_TOKEN=... node --experimental-websocket tests/js/test_idle_s24.mjs
//        the cases against a real server started with that token (`kvmemo serve`
//        reads the same variable) and a short --idle-timeout, e.g. 0.3
//        (tests/test_js_client.py starts one). They never sleep: they wait for
//        the client's events, and use the idle close of a second, unused client
//        as the clock that proves something did NOT happen.
// Exits 1 on a failure; the last line says "N passed, M failed".

import assert from "node:assert/strict";
import {ClientState, IDLE_CLOSE, KVMemoClient} from "../../kvmemo/server/static/kvmemo.js";
import {FakeWebSocket, run, settled, tick} from "./harness.mjs";

const once = (target, type) => new Promise((resolve) => target.addEventListener(type, (ev) => resolve(ev.detail), {once: true}));

function record(client) {
  const events = [];
  for (const type of ["open", "close", "reconnecting"]) {
    client.addEventListener(type, (ev) => events.push({type, ...ev.detail}));
  }
  return events;
}

const sockets = () => FakeWebSocket.instances;
const lastSocket = () => FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
// A reconnection delay of 0: a client that reconnected at once would have its
// new socket by the next macrotask (`tick`), so one tick proves it did not.
const NOW = {initialMs: 0, maxMs: 0, factor: 2, jitter: 0};

async function openFake(options = {}) {
  const client = new KVMemoClient("ws://kv.test/ws", {WebSocketImpl: FakeWebSocket, backoff: NOW, ...options});
  const ws = lastSocket();
  ws.serverOpen();
  if (options.token) ws.replyAll(() => "OK");
  await client.ready;
  return client;
}

const unit = [];
const live = [];
const test = (name, fn) => unit.push({name, fn});
const liveTest = (name, fn) => live.push({name, fn});

test("after the server's idle close with nothing at stake the client goes idle: no socket, no timer", async () => {
  const client = await openFake();
  const events = record(client);
  lastSocket().idleClose();
  assert.equal(client.state, ClientState.IDLE);
  assert.equal(client.state, "idle");
  await tick(); // a reconnection (delay 0) would have opened its socket by now
  await tick();
  assert.equal(sockets().length, 1);
  assert.deepEqual(events, [
    {type: "close", code: 1008, reason: "idle timeout", wasClean: true, willReconnect: true, idle: true},
  ]);
  assert.equal(client.queued, 0);
  assert.equal(client.inflight, 0);
});

test("the next call opens one socket, sends auth first, then the calls of its turn as one batch", async () => {
  const client = await openFake({token: "s3cret"});
  const events = record(client);
  lastSocket().idleClose();
  const a = client.get("a");
  const b = client.set("b", "2");
  assert.equal(client.state, ClientState.IDLE); // the socket opens in the flush of this turn
  await Promise.resolve();
  assert.equal(sockets().length, 2);
  assert.equal(client.state, ClientState.RECONNECTING);
  const ws = lastSocket();
  ws.serverOpen();
  assert.deepEqual(ws.sent.map((m) => m.method), ["auth"]);
  assert.deepEqual(ws.sent[0].params, ["s3cret"]);
  ws.replyAll(() => "OK");
  assert.equal(client.state, ClientState.OPEN);
  assert.deepEqual(ws.sent[1].map((r) => r.method), ["get", "set"]);
  ws.replyAll((r) => `${r.method}!`);
  assert.deepEqual(await Promise.all([a, b]), ["get!", "set!"]);
  assert.deepEqual(
    events.map((e) => e.type),
    ["close", "reconnecting", "open"],
  );
  assert.deepEqual(events[1], {type: "reconnecting", attempt: 1, delayMs: 0});
  assert.deepEqual(events[2], {type: "open", reconnected: true});
});

test("calls made while idle or while its socket opens are not refused by queueLimit", async () => {
  const client = await openFake({queueLimit: 0});
  lastSocket().idleClose();
  const a = settled(client.get("a"));
  const b = settled(client.get("b"));
  await Promise.resolve();
  const c = settled(client.get("c")); // a later turn, while the socket opens
  await tick();
  assert.ok(!a.done && !b.done && !c.done, "none was refused");
  const ws = lastSocket();
  ws.serverOpen();
  assert.deepEqual(ws.sent[0].map((r) => r.params[0]), ["a", "b", "c"]);
  ws.replyAll((r) => r.params[0].toUpperCase());
  await tick();
  assert.deepEqual([a.value, b.value, c.value], ["A", "B", "C"]);
});

test("a notification made while idle opens the socket too", async () => {
  const client = await openFake();
  lastSocket().idleClose();
  client.notify("set", "k", "v");
  await Promise.resolve();
  assert.equal(sockets().length, 2);
  lastSocket().serverOpen();
  assert.deepEqual(lastSocket().sent, [{jsonrpc: "2.0", method: "set", params: ["k", "v"]}]);
});

test("a call in flight when the idle close comes rejects DISCONNECTED and the client reconnects at once", async () => {
  const client = await openFake();
  const events = record(client);
  const p = settled(client.get("k"));
  await tick();
  lastSocket().idleClose(); // the server closed as the call arrived
  await tick();
  assert.equal(p.error?.kind, "DISCONNECTED");
  assert.equal(sockets().length, 2, "a reconnection, without waiting for a call");
  assert.equal(events[0].idle, false);
  assert.equal(events[0].willReconnect, true);
  assert.equal(events[1].type, "reconnecting");
});

test("a call queued in the turn of the idle close is sent after an immediate reconnection", async () => {
  const client = await openFake();
  const p = client.get("k");
  lastSocket().idleClose(); // before this turn's flush
  assert.equal(client.state, ClientState.RECONNECTING);
  await tick();
  assert.equal(sockets().length, 2);
  const ws = lastSocket();
  ws.serverOpen();
  ws.replyAll(() => "v");
  assert.equal(await p, "v");
});

test("a subscribed client reconnects at once after an idle close and subscribes again", async () => {
  const client = await openFake();
  const sub = client.subscribe("news", () => {});
  await tick();
  lastSocket().replyAll(() => [["subscribe", "news", 1]]);
  await sub;
  lastSocket().idleClose();
  assert.equal(client.state, ClientState.RECONNECTING);
  await tick();
  assert.equal(sockets().length, 2);
  lastSocket().serverOpen();
  await tick();
  assert.deepEqual(lastSocket().sent[0], {jsonrpc: "2.0", id: lastSocket().sent[0].id, method: "subscribe", params: ["news"]});
});

test("another close with code 1008 (not the idle one) reconnects at once", async () => {
  const client = await openFake();
  lastSocket().serverClose(1008, "output buffer limit reached", true);
  assert.equal(client.state, ClientState.RECONNECTING);
  await tick();
  assert.equal(sockets().length, 2);
});

test("close() from the idle state settles at once, and later calls reject CLOSED", async () => {
  const client = await openFake();
  lastSocket().idleClose();
  await client.close();
  assert.equal(client.state, ClientState.CLOSED);
  await assert.rejects(client.get("k"), (e) => e.kind === "CLOSED");
  await tick();
  assert.equal(sockets().length, 1);
});

test("a wake-up socket that fails is retried with backoff, counts toward maxAttempts, and queueLimit applies again", async () => {
  const client = await openFake({backoff: {...NOW, maxAttempts: 2}, queueLimit: 1});
  const events = record(client);
  lastSocket().idleClose();
  const a = settled(client.get("a"));
  const b = settled(client.get("b"));
  await Promise.resolve();
  lastSocket().serverClose(1006); // the server is gone now: attempt 1 failed
  assert.equal(client.state, ClientState.RECONNECTING);
  await assert.rejects(client.get("c"), (e) => e.kind === "QUEUE_FULL");
  await tick();
  assert.equal(sockets().length, 3);
  lastSocket().serverClose(1006); // attempt 2 failed: gives up
  await tick();
  assert.equal(client.state, ClientState.CLOSED);
  assert.equal(a.error?.kind, "DISCONNECTED");
  assert.equal(b.error?.kind, "DISCONNECTED");
  assert.deepEqual(
    events.filter((e) => e.type === "reconnecting").map((e) => e.attempt),
    [1, 2],
  );
  assert.equal(events[events.length - 1].willReconnect, false);
});

test("with reconnect off the idle close closes the client, as any close does", async () => {
  const client = await openFake({reconnect: false});
  const closed = once(client, "close");
  lastSocket().idleClose();
  assert.deepEqual(await closed, {code: 1008, reason: "idle timeout", wasClean: true, willReconnect: false, idle: false});
  assert.equal(client.state, ClientState.CLOSED);
});

// ---- against a real server (--idle-timeout, a token) ----

const URL = process.env.KVMEMO_URL;
const TOKEN = process.env.KVMEMO_AUTH_TOKEN ?? null;

// The real WebSocket, counting the sockets a client opens and what it sends on each.
function spy() {
  const opened = [];
  class SpyWebSocket extends globalThis.WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      this.sentMessages = [];
      opened.push(this);
    }

    send(text) {
      this.sentMessages.push(JSON.parse(text));
      super.send(text);
    }
  }
  return {SpyWebSocket, opened};
}

async function connect(extra = {}) {
  const {SpyWebSocket, opened} = spy();
  // A reconnection delay of 0: a client that reconnected at once would show it at the next tick.
  const client = await KVMemoClient.connect(URL, {WebSocketImpl: SpyWebSocket, token: TOKEN, backoff: NOW, ...extra});
  return {client, opened, events: record(client)};
}

// Resolves with the detail of the client's next close, which must be the
// server's idle close (--idle-timeout).
function idleClose(client) {
  return new Promise((resolve, reject) => {
    client.addEventListener(
      "close",
      (ev) => {
        const {code, reason} = ev.detail;
        if (code === IDLE_CLOSE.code && reason === IDLE_CLOSE.reason) resolve(ev.detail);
        else reject(new Error(`not the idle close: ${JSON.stringify(ev.detail)}`));
      },
      {once: true},
    );
  });
}

liveTest("after the idle close no socket opens until a call, which succeeds on a new authenticated socket", async () => {
  const {client, opened, events} = await connect();
  const detail = await idleClose(client);
  await tick(); // a reconnection (delay 0) would have opened its socket by now
  assert.equal(opened.length, 1);
  assert.equal(client.state, ClientState.IDLE);
  assert.deepEqual(detail, {code: 1008, reason: "idle timeout", wasClean: true, willReconnect: true, idle: true});
  // A whole idle period of another client later, still nothing: the page is quiet.
  const clock = await connect();
  await idleClose(clock.client);
  assert.equal(opened.length, 1);
  assert.equal(client.state, ClientState.IDLE);
  assert.deepEqual(events.map((e) => e.type), ["close"]);

  // One turn, one message: nothing can idle out between the two calls.
  assert.deepEqual(await Promise.all([client.set("idle:s24", "v"), client.get("idle:s24")]), ["OK", "v"]);
  assert.equal(opened.length, 2);
  const sent = opened[1].sentMessages;
  if (TOKEN !== null) assert.deepEqual([sent[0].method, sent[0].params], ["auth", [TOKEN]]);
  assert.deepEqual(sent[sent.length - 1].map((r) => r.method), ["set", "get"]);
  assert.deepEqual(events.map((e) => e.type), ["close", "reconnecting", "open"]);
  assert.deepEqual(events[1], {type: "reconnecting", attempt: 1, delayMs: 0});
  assert.deepEqual(events[2], {type: "open", reconnected: true});
  // Left alone again, it goes idle again: one close per use, not one per period.
  await idleClose(client);
  assert.equal(opened.length, 2);
  await Promise.all([client.close(), clock.client.close()]);
});

liveTest("a subscribed client keeps its session: the server never idle-closes it", async () => {
  const listener = await connect();
  let heard;
  const message = new Promise((resolve) => (heard = resolve));
  await listener.client.subscribe("idle:news", (data, channel) => heard([channel, data]));
  // Connected after the subscription's reply: its idle close comes after the
  // listener's would have.
  const clock = await connect();
  await idleClose(clock.client);
  assert.equal(await listener.client.ping(), "PONG"); // whatever the server sent before, now arrived
  assert.equal(listener.opened.length, 1);
  assert.deepEqual(listener.events, []);
  assert.equal(await clock.client.publish("idle:news", "hello"), 1);
  assert.deepEqual(await message, ["idle:news", "hello"]);
  // Without subscriptions it idles out, and goes idle rather than reconnecting.
  await listener.client.unsubscribe();
  await idleClose(listener.client);
  assert.equal(listener.client.state, ClientState.IDLE);
  assert.equal(listener.opened.length, 1);
  await Promise.all([listener.client.close(), clock.client.close()]);
});

liveTest("close() from the idle state settles, and the client opens nothing more", async () => {
  const {client, opened} = await connect();
  await idleClose(client);
  await tick();
  assert.equal(client.state, ClientState.IDLE);
  await client.close();
  assert.equal(client.state, ClientState.CLOSED);
  await assert.rejects(client.get("k"), (e) => e.kind === "CLOSED");
  assert.equal(await client.ready, client); // settled long ago, and stays so
  assert.equal(opened.length, 1);
});

// ---- runner ----

await run(URL ? live : unit, 5000); // ms: a test that hangs (a promise never settled) fails
