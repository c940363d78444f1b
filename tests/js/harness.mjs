// What the JS test files share: a scriptable WebSocket (the test plays the
// server), `tick`, and the runner. Node >= 20, no packages.

import {IDLE_CLOSE} from "../../kvmemo/server/static/kvmemo.js";

/** A WebSocket whose server side the test plays; every one made is in `instances`. */
export class FakeWebSocket {
  static instances = [];
  static throwOnConstruct = null;

  constructor(url, protocols) {
    if (FakeWebSocket.throwOnConstruct) throw FakeWebSocket.throwOnConstruct;
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    FakeWebSocket.instances.push(this);
  }

  send(text) {
    if (this.readyState !== 1) throw new Error("InvalidStateError");
    this.sent.push(JSON.parse(text));
  }

  close(code = 1000, reason = "") {
    if (this.readyState >= 2) return;
    this.readyState = 2;
    setTimeout(() => this.serverClose(code, reason, true), 0);
  }

  // -- the test plays the server --
  serverOpen() {
    this.readyState = 1;
    this.onopen?.({type: "open"});
  }

  serverSend(message) {
    this.onmessage?.({type: "message", data: typeof message === "string" ? message : JSON.stringify(message)});
  }

  serverClose(code = 1006, reason = "", wasClean = false) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({type: "close", code, reason, wasClean});
  }

  /** The server's idle close (--idle-timeout). */
  idleClose() {
    this.serverClose(IDLE_CLOSE.code, IDLE_CLOSE.reason, true);
  }

  /** Answers every request of the last message sent with fn(request) as result. */
  replyAll(fn, {reverse = false} = {}) {
    const last = this.sent[this.sent.length - 1];
    const requests = (Array.isArray(last) ? last : [last]).filter((r) => "id" in r);
    const responses = requests.map((r) => ({jsonrpc: "2.0", id: r.id, result: fn(r)}));
    if (reverse) responses.reverse();
    this.serverSend(Array.isArray(last) ? responses : responses[0]);
  }
}

export const tick = () => new Promise((resolve) => setTimeout(resolve, 0));

/** A box that says whether `promise` settled yet, and with what (`value` or `error`). */
export function settled(promise) {
  const box = {done: false};
  promise.then(
    (value) => Object.assign(box, {done: true, value}),
    (error) => Object.assign(box, {done: true, error}),
  );
  return box;
}

/**
 * Runs `tests` ({name, fn} each) in order, each within `timeoutMs` (a test that
 * hangs on a promise never settled fails) and failing on an unhandled rejection
 * it left; prints one line per test and "N passed, M failed", then exits 1 on a
 * failure.
 */
export async function run(tests, timeoutMs) {
  let failed = 0;
  let stray = [];
  process.on("unhandledRejection", (error) => stray.push(error));
  for (const {name, fn} of tests) {
    FakeWebSocket.instances = [];
    FakeWebSocket.throwOnConstruct = null;
    stray = [];
    let timer;
    try {
      await Promise.race([
        fn(),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms`)), timeoutMs);
        }),
      ]);
      await tick();
      if (stray.length) throw stray[0];
      console.log(`ok    ${name}`);
    } catch (error) {
      failed++;
      console.log(`FAIL  ${name}\n      ${String(error.stack ?? error).split("\n").join("\n      ")}`);
    } finally {
      clearTimeout(timer);
    }
  }
  console.log(`\n${tests.length - failed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}
