/**
 * kvmemo.js — a dependency-free client for KVMemo's WebSocket port.
 *
 * Plain ES module; runs as served in any browser with WebSocket and
 * EventTarget, and in Node >= 20 when given a WebSocket implementation
 * (`WebSocketImpl` option). Speaks PROTOCOL.md version 1: JSON-RPC 2.0 over
 * one WebSocket, subprotocol "kvmemo.v1"; with a server of version 1.2, also
 * transactions (`transaction`, `watch`, `unwatch`); of version 1.4, also
 * publish/subscribe (`subscribe`, `psubscribe`, `unsubscribe`, `punsubscribe`,
 * `publish`).
 *
 *     import {KVMemoClient} from "/static/kvmemo.js";
 *     const kv = await KVMemoClient.connect("/ws");
 *     await kv.set("greeting", "hello", "EX", 60);
 *     const [a, b] = await Promise.all([kv.get("a"), kv.get("b")]); // one batch
 *
 * Design
 * ------
 * Batching. Every call is serialized at once (bad params fail immediately)
 * and put in an outbox; the first call of a turn schedules a flush with
 * `queueMicrotask`. The flush therefore runs when the code that is running
 * now, and the microtasks queued before the flush, have finished: calls made
 * synchronously one after another (for example the arguments of one
 * `Promise.all`) leave as ONE WebSocket message. A flush of one request sends
 * the plain request object; of several, a JSON-RPC batch array. A microtask
 * (not `setTimeout(0)`) was chosen so that batching never adds latency: the
 * message leaves before the browser yields to rendering or I/O. Calls made
 * after an `await` that really waits land in a later batch.
 *
 * Ids. Integers from a counter that starts at 1 and is never reset, not even
 * across reconnections, so a reply can never be matched to the wrong call.
 * Replies (single or batch, in any order) are matched by id alone.
 *
 * Delivery is at most once. A call that was sent and whose socket died before
 * the reply rejects with kind "DISCONNECTED" (code null): it may or may not
 * have been applied, so it is never resent. A call that was not sent yet (made
 * while connecting, reconnecting, or in the turn the socket died) waits in the
 * outbox — at most `queueLimit` of them, more reject with kind "QUEUE_FULL"
 * (calls made while "idle" are not counted, see "Idle close") —
 * and leaves in the first batch after the next successful (re)connection.
 *
 * Reconnection. When the socket closes without `close()` having been called,
 * and `reconnect` is true, a new socket is opened (unless the close is the
 * server's idle close, see "Idle close") after
 * `min(maxMs, initialMs * factor ** (attempt - 1))` milliseconds, spread by
 * ±`jitter` (a fraction; 0.2 = ±20 %) so that many browsers restarted by one
 * server restart do not reconnect in lock step; the delay is capped at
 * `maxMs`. The attempt count resets after a connection succeeds. A failed
 * first connection is retried the same way; `ready` resolves on the first
 * success. A browser tells a page nothing of why a socket failed (a server
 * down, a wrong path, an origin or a URL token refused: all close code 1006),
 * so by default the client tries forever; with `backoff.maxAttempts` it gives
 * up after that many attempts in a row: it closes for good, and `ready` (if it
 * never opened) and every waiting call reject with kind "DISCONNECTED". With
 * a `token`, `auth` is the first request of every socket and the outbox is
 * held until it succeeds; a NOAUTH reply is permanent (a wrong token stays
 * wrong) and closes the client.
 *
 * Idle close. A server started with `--idle-timeout` closes a session that
 * sent nothing for that long, with code 1008 and reason "idle timeout"
 * (`IDLE_CLOSE`), unless a request is running or the session is subscribed.
 * Reconnecting at once would only start the next idle period (a page left
 * open would reconnect every period, forever, and the timeout would free
 * nothing), so when that close comes while nothing is in flight, nothing is
 * queued and nothing is subscribed (no channel nor pattern has a callback),
 * the client goes to state "idle": no socket and no timer. It dispatches
 * "close" with `idle: true` and `willReconnect: true`, and no "reconnecting".
 * The next call (or notification) opens a new socket lazily: in the flush of
 * the turn that made it, the client enters "reconnecting", dispatches
 * "reconnecting" {attempt: 1, delayMs: 0} and opens the socket; it then goes
 * as any reconnection does (auth first with a token, "open" with
 * `reconnected: true`, the calls of that turn in one batch; a failure is
 * retried with backoff as attempt 2, ... and counts toward maxAttempts). The
 * calls made while idle, or while that socket opens, are not held to
 * `queueLimit`: the server was not lost, it only closed an unused socket (the
 * limit applies again once that socket fails). An idle close that races with a
 * call (a call sent as the server closed, or queued in that turn) or that
 * comes to a subscribed client is a loss like any other: the client
 * reconnects at once, as described above. With `reconnect` off, the idle
 * close closes the client like any close. `close()` from "idle" settles at
 * once (there is no socket).
 *
 * Whole-message errors. The server answers a message it cannot split into
 * requests (a batch over its length limit, say) with one error whose id is
 * null. Such an error is given to the calls of one message of which no reply
 * has arrived yet: when the error says the length of the batch it answers
 * (`data.length`, as a batch over the server's limit does), the first such
 * message of that length (several of one length are all over the limit, and
 * the server answers them in sending order); else the only such message,
 * when exactly one exists. Otherwise it is reported as an "error" event only.
 *
 * Publish/subscribe (version 1.4). The server pushes each message as a
 * JSON-RPC notification (an object with "method" and no "id"):
 * `{"jsonrpc": "2.0", "method": "message", "params": [channel, data]}` or
 * `{..., "method": "pmessage", "params": [pattern, channel, data]}`. The client
 * calls the callback given to `subscribe` for that channel (or to
 * `psubscribe` for that pattern) as `onMessage(data, channel, pattern)`
 * (`pattern` null for a channel's own message) and dispatches a "message"
 * event. A subscribed session keeps running every other call. Subscriptions
 * belong to the server session, so after a reconnection the client subscribes
 * again to every channel and pattern that has a callback, before the calls
 * that waited for the connection (messages published while it was away are
 * lost, as pub/sub keeps nothing). A server that finds
 * the client too slow to read its messages closes the socket with 1008
 * (reconnection then subscribes again).
 *
 * Errors. Server errors reject with KVMemoError {code, kind, data} as in
 * PROTOCOL.md ("Errors"). Errors made on this side have code null and one of
 * the kinds in `ClientErrorKind`.
 *
 * Events (an EventTarget; each also calls the `on<type>` property if set):
 *   "open"          {reconnected}                a socket is ready (after auth)
 *   "close"         {code, reason, wasClean, willReconnect, idle}
 *                                                a socket closed; willReconnect
 *                                                false: the client is closed for
 *                                                good; idle true: it went "idle"
 *                                                and reconnects on the next call
 *   "reconnecting"  {attempt, delayMs}           a reconnection is scheduled
 *                                                (delayMs 0: opening now)
 *   "error"         {error}                      something went wrong that
 *                                                no call can be told about
 *   "message"       {channel, data, pattern}     a published message arrived
 *                                                (pattern null unless psubscribed)
 * Each event is a KVMemoEvent whose `detail` holds the fields above.
 */

/** The subprotocol the server offers for version 1 (PROTOCOL.md, "Transport"). */
export const DEFAULT_SUBPROTOCOL = "kvmemo.v1";

/** Calls that may wait for a connection; bounds memory while the server is away. */
export const DEFAULT_QUEUE_LIMIT = 1000; // calls

/**
 * Requests per batch message at most: the server's default `--max-batch`. A
 * longer batch would be refused whole (TOO_LARGE), so a busier turn leaves as
 * several messages.
 */
export const DEFAULT_MAX_BATCH = 10000; // requests

/** Reconnection delays: milliseconds, growth factor, and ± jitter fraction. */
export const DEFAULT_BACKOFF = Object.freeze({initialMs: 100, maxMs: 5000, factor: 2, jitter: 0.2});

/**
 * The close a server gives a session idle for `--idle-timeout` (kvmemo/server/session.py):
 * code 1008 (policy) with this reason. See "Idle close" above.
 */
export const IDLE_CLOSE = Object.freeze({code: 1008, reason: "idle timeout"});

/** The states of a client, in `client.state`. */
export const ClientState = Object.freeze({
  CONNECTING: "connecting", // first socket being opened (or authenticated)
  OPEN: "open", // connected and authenticated; calls are sent as made
  RECONNECTING: "reconnecting", // waiting for, or opening, a later socket
  IDLE: "idle", // the server closed the unused connection (idle timeout): no socket, no
  // timer; the next call opens a socket (see "Idle close")
  CLOSED: "closed", // for good: close() was called, the connection ended with reconnect off, or
  // backoff.maxAttempts attempts in a row failed
});

/** Error kinds of errors made by the client itself (their `code` is null). */
export const ClientErrorKind = Object.freeze({
  DISCONNECTED: "DISCONNECTED", // the socket died before the reply; the call may have been applied
  CLOSED: "CLOSED", // the client was closed with close(), or could not open a socket at all
  QUEUE_FULL: "QUEUE_FULL", // too many calls waiting for a connection; this one was not sent
  BAD_RESPONSE: "BAD_RESPONSE", // the server sent something that is not a JSON-RPC response
});

// Kinds for codes that have exactly one (PROTOCOL.md "Errors"); used only when
// a server error comes without data.kind. -32602 has two kinds, so none.
const KIND_BY_CODE = new Map([
  [-32700, "PARSE"],
  [-32600, "INVALID_REQUEST"],
  [-32601, "UNKNOWN_METHOD"],
  [-32603, "INTERNAL"],
  [-32000, "NOT_INTEGER"],
  [-32001, "NOAUTH"],
  [-32002, "OOM"],
  [-32003, "UNAVAILABLE"],
  [-32004, "TOO_LARGE"],
  [-32005, "OVERLOADED"],
  [-32006, "TIMEOUT"],
  [-32007, "DISABLED"],
  [-32008, "IO"],
]);

const WS_OPEN = 1; // WebSocket.OPEN, spelled out so fakes need not define it

/** A failed call: a server error (code, kind from error.data.kind, data) or a client one (code null). */
export class KVMemoError extends Error {
  /**
   * @param {string} message for people
   * @param {{code?: number|null, kind?: string|null, data?: any, cause?: any}} [fields]
   */
  constructor(message, {code = null, kind = null, data = null, cause = undefined} = {}) {
    super(message, cause === undefined ? undefined : {cause});
    this.name = "KVMemoError";
    /** JSON-RPC error code, or null for errors made by the client. */
    this.code = code;
    /** Stable machine-readable name ("SYNTAX", "OOM", "DISCONNECTED", ...). */
    this.kind = kind;
    /** error.data as sent by the server (includes kind), or null. */
    this.data = data;
  }

  /**
   * Builds the error for a JSON-RPC error object as received.
   * @param {any} error the `error` member of a response
   * @returns {KVMemoError}
   */
  static fromWire(error) {
    if (error === null || typeof error !== "object") {
      return new KVMemoError(`malformed error from server: ${JSON.stringify(error)}`, {
        kind: ClientErrorKind.BAD_RESPONSE,
      });
    }
    const code = Number.isInteger(error.code) ? error.code : null;
    const data = error.data === undefined ? null : error.data;
    const kind =
      data !== null && typeof data === "object" && typeof data.kind === "string"
        ? data.kind
        : KIND_BY_CODE.get(code) ?? null;
    const message = typeof error.message === "string" ? error.message : `server error ${code}`;
    return new KVMemoError(message, {code, kind, data});
  }
}

/** The events a KVMemoClient dispatches; `detail` holds the event's fields. */
export class KVMemoEvent extends Event {
  constructor(type, detail = {}) {
    super(type);
    this.detail = detail;
  }
}

/**
 * The delay before reconnection attempt `attempt` (1 for the first).
 *
 * @param {number} attempt 1, 2, 3, ...
 * @param {{initialMs?: number, maxMs?: number, factor?: number, jitter?: number}} [backoff]
 * @param {() => number} [random] a source of numbers in [0, 1)
 * @returns {number} whole milliseconds in [0, maxMs]
 */
export function backoffDelay(attempt, backoff = DEFAULT_BACKOFF, random = Math.random) {
  const {initialMs, maxMs, factor, jitter} = {...DEFAULT_BACKOFF, ...backoff};
  const base = Math.min(maxMs, initialMs * factor ** Math.max(0, attempt - 1));
  const spread = base * jitter * (2 * random() - 1);
  return Math.round(Math.min(maxMs, Math.max(0, base + spread)));
}

/**
 * Splits a Redis-like command line into words, as redis-cli does: words are
 * separated by blanks; "double quotes" allow the escapes \" \\ \n \r \t \b \a
 * and \xHH; 'single quotes' allow only \'. Quoted parts glue to adjacent text
 * (`a"b c"` is one word `ab c`); `""` is an empty word.
 *
 * @param {string} line
 * @returns {string[]}
 * @throws {SyntaxError} on an unterminated quote
 */
export function tokenize(line) {
  const words = [];
  const escapes = {n: "\n", r: "\r", t: "\t", b: "\b", a: "\x07", '"': '"', "\\": "\\"};
  let i = 0;
  const n = line.length;
  while (i < n) {
    while (i < n && /\s/.test(line[i])) i++;
    if (i >= n) break;
    let word = "";
    while (i < n && !/\s/.test(line[i])) {
      const ch = line[i];
      if (ch === '"') {
        const start = i++;
        for (;;) {
          if (i >= n) throw new SyntaxError(`unterminated double quote at column ${start + 1}`);
          const c = line[i];
          if (c === '"') {
            i++;
            break;
          }
          if (c === "\\" && i + 1 < n) {
            const e = line[i + 1];
            if (e === "x" && /^[0-9a-fA-F]{2}$/.test(line.slice(i + 2, i + 4))) {
              word += String.fromCharCode(parseInt(line.slice(i + 2, i + 4), 16));
              i += 4;
            } else {
              word += escapes[e] ?? e;
              i += 2;
            }
            continue;
          }
          word += c;
          i++;
        }
      } else if (ch === "'") {
        const start = i++;
        for (;;) {
          if (i >= n) throw new SyntaxError(`unterminated single quote at column ${start + 1}`);
          const c = line[i];
          if (c === "'") {
            i++;
            break;
          }
          if (c === "\\" && line[i + 1] === "'") {
            word += "'";
            i += 2;
            continue;
          }
          word += c;
          i++;
        }
      } else {
        word += ch;
        i++;
      }
    }
    words.push(word);
  }
  return words;
}

// Keys and values travel as JSON strings; numbers given for them are sent as
// their decimal text so that `set("n", 42)` does what it says.
function asString(what, x) {
  if (typeof x === "string") return x;
  if (typeof x === "number" || typeof x === "bigint") return String(x);
  throw new TypeError(`${what} must be a string or a number, got ${x === null ? "null" : typeof x}`);
}

// Numeric arguments may be integers or decimal strings; BigInts (not JSON) become strings.
function asNumberArg(x) {
  return typeof x === "bigint" ? String(x) : x;
}

// {ex: 10, nx: true, get: true} -> ["EX", 10, "NX", "GET"], in the order of SET's syntax.
const SET_VALUE_OPTIONS = ["ex", "px", "exat", "pxat"];
const SET_FLAG_OPTIONS = ["keepttl", "nx", "xx", "get"];
function setOptionWords(options) {
  const words = [];
  for (const name of Object.keys(options)) {
    if (!SET_VALUE_OPTIONS.includes(name) && !SET_FLAG_OPTIONS.includes(name)) {
      throw new TypeError(`unknown SET option '${name}'`);
    }
  }
  for (const name of SET_VALUE_OPTIONS) {
    if (options[name] !== undefined && options[name] !== null) words.push(name.toUpperCase(), asNumberArg(options[name]));
  }
  for (const name of SET_FLAG_OPTIONS) if (options[name]) words.push(name.toUpperCase());
  return words;
}

// One call of a transaction, [method, param, ...], checked as a single call's
// params are: a non-empty method name, then strings and numbers (a BigInt
// becomes its decimal text, as asNumberArg does). Returns a copy to send.
function transactionCall(call, index) {
  if (!Array.isArray(call)) {
    const got = call === null ? "null" : typeof call;
    throw new TypeError(`transaction call ${index} must be an array [method, param, ...], got ${got}`);
  }
  const [method, ...params] = call;
  if (typeof method !== "string" || method === "") {
    throw new TypeError(`transaction call ${index}: method must be a non-empty string, got ${JSON.stringify(method)}`);
  }
  return [
    method,
    ...params.map((x, i) => {
      if (typeof x === "string" || (typeof x === "number" && Number.isFinite(x))) return x;
      if (typeof x === "bigint") return String(x);
      const got = x === null ? "null" : Array.isArray(x) ? "an array" : typeof x === "number" ? String(x) : typeof x;
      throw new TypeError(
        `transaction call ${index} ('${method}'): param ${i + 1} must be a string or a finite number, got ${got}`,
      );
    }),
  ];
}

// The params of `call` and `notify`, checked as a transaction call's are
// (strings and finite numbers; a BigInt becomes its decimal text): JSON would
// silently turn NaN, Infinity, undefined or a function into null, and refuse a
// BigInt with a message that names no param. A transaction's params are calls.
function requestParams(method, params) {
  if (method === "transaction") return params.map((call, i) => transactionCall(call, i));
  return params.map((x, i) => {
    if (typeof x === "string" || (typeof x === "number" && Number.isFinite(x))) return x;
    if (typeof x === "bigint") return String(x);
    const got = x === null ? "null" : Array.isArray(x) ? "an array" : typeof x === "number" ? String(x) : typeof x;
    throw new TypeError(`'${method}': param ${i + 1} must be a string or a finite number, got ${got}`);
  });
}

// mset's and msetnx's arguments: key, value, ... or one {key: value} object or Map.
function pairWords(kv) {
  let flat = kv;
  if (kv.length === 1 && (kv[0] instanceof Map || isPlainObject(kv[0]))) {
    const entries = kv[0] instanceof Map ? [...kv[0]] : Object.entries(kv[0]);
    flat = entries.flat();
  }
  return flat.map((x, i) => asString(i % 2 === 0 ? "key" : "value", x));
}

// {ex: 10} -> ["EX", 10]; {persist: true} -> ["PERSIST"] (GETEX's options).
function getexOptionWords(options) {
  const words = [];
  for (const name of Object.keys(options)) {
    if (!SET_VALUE_OPTIONS.includes(name) && name !== "persist") throw new TypeError(`unknown GETEX option '${name}'`);
  }
  for (const name of SET_VALUE_OPTIONS) {
    if (options[name] !== undefined && options[name] !== null) words.push(name.toUpperCase(), asNumberArg(options[name]));
  }
  if (options.persist) words.push("PERSIST");
  return words;
}

function isPlainObject(x) {
  return x !== null && typeof x === "object" && !Array.isArray(x) && Object.getPrototypeOf(x) === Object.prototype;
}

// A relative "/ws" is taken against the page's origin, and http(s) becomes ws(s).
function resolveUrl(url) {
  let text = String(url);
  const loc = globalThis.location;
  if (text.startsWith("/") && !text.startsWith("//") && loc && loc.host) {
    text = `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}${text}`;
  }
  return text.replace(/^http(s?):/i, "ws$1:");
}

/**
 * A KVMemo connection with automatic batching, id matching and reconnection.
 *
 * Invariant: every call is in exactly one place until it settles — the outbox
 * (not sent), or `#inflight` (sent on the current socket) — and every call in
 * `#inflight` was sent on `#ws`; when that socket dies they all reject.
 */
export class KVMemoClient extends EventTarget {
  /** @type {((ev: KVMemoEvent) => void) | null} */ onopen = null;
  /** @type {((ev: KVMemoEvent) => void) | null} */ onclose = null;
  /** @type {((ev: KVMemoEvent) => void) | null} */ onerror = null;
  /** @type {((ev: KVMemoEvent) => void) | null} */ onreconnecting = null;
  /** @type {((ev: KVMemoEvent) => void) | null} */ onmessage = null;
  /** Resolves (to the client) once the first connection is open and authenticated. */
  ready;

  #url;
  #subprotocol;
  #reconnect;
  #backoff;
  #maxAttempts;
  #token;
  #queueLimit;
  #maxBatch;
  #WebSocket;

  #state = ClientState.CONNECTING;
  #ws = null;
  #nextId = 1;
  #nextSeq = 1;
  /** @type {{text: string, entry: object | null}[]} requests not yet sent */
  #outbox = [];
  #flushScheduled = false;
  /** @type {Map<number, {method: string, resolve: Function, reject: Function, seq: number}>} */
  #inflight = new Map();
  /**
   * Sent messages with replies outstanding, in sending order: `size` calls
   * await a reply, `remaining` still do; `length` is the number of requests
   * (notifications too) the message held.
   * @type {Map<number, {size: number, remaining: number, length: number}>}
   */
  #messages = new Map();
  #attempt = 0;
  #reconnectTimer = null;
  /** True from an idle client's next call until that socket opens or fails. */
  #waking = false;
  #everOpened = false;
  #closeError = null;
  #resolveReady;
  #rejectReady;
  #closedWaiters = [];
  /** @type {Map<string, Function>} channel -> callback of `subscribe` */
  #channelHandlers = new Map();
  /** @type {Map<string, Function>} pattern -> callback of `psubscribe` */
  #patternHandlers = new Map();

  /**
   * Opens the connection at once; await `client.ready` (or use the static
   * `connect`) before relying on it. Calls made before then are queued.
   *
   * @param {string | URL} url ws://host:port/ws, wss://..., or "/ws" (same origin as the page)
   * @param {object} [options]
   * @param {string | null} [options.subprotocol="kvmemo.v1"] null to ask for none
   * @param {boolean} [options.reconnect=true]
   * @param {{initialMs?: number, maxMs?: number, factor?: number, jitter?: number,
   *   maxAttempts?: number}} [options.backoff] delays, and the reconnection attempts in a row
   *   before the client gives up and closes (default Infinity: never)
   * @param {string | null} [options.token=null] sent with `auth` first on every socket
   * @param {number} [options.queueLimit=1000] calls that may wait for a connection
   * @param {number} [options.maxBatch=10000] longest batch sent (Infinity: no limit): the
   *   calls of a busier turn leave as several messages; the server's default `--max-batch`,
   *   so set it to that server's limit when it was given another
   * @param {Function} [options.WebSocketImpl=globalThis.WebSocket] a WebSocket constructor
   * @throws {TypeError|RangeError} on a bad option
   */
  constructor(url, options = {}) {
    super();
    const {
      subprotocol = DEFAULT_SUBPROTOCOL,
      reconnect = true,
      backoff = {},
      token = null,
      queueLimit = DEFAULT_QUEUE_LIMIT,
      maxBatch = DEFAULT_MAX_BATCH,
      WebSocketImpl = globalThis.WebSocket,
    } = options;
    if (typeof WebSocketImpl !== "function") {
      throw new TypeError("no WebSocket implementation: pass options.WebSocketImpl");
    }
    if (!Number.isInteger(queueLimit) || queueLimit < 0) {
      throw new RangeError(`queueLimit must be an integer >= 0, got ${queueLimit}`);
    }
    if (!(maxBatch === Infinity || (Number.isInteger(maxBatch) && maxBatch >= 1))) {
      throw new RangeError(`maxBatch must be an integer >= 1, got ${maxBatch}`);
    }
    const {maxAttempts = Infinity, ...delays} = backoff ?? {};
    if (!(maxAttempts === Infinity || (Number.isInteger(maxAttempts) && maxAttempts >= 1))) {
      throw new RangeError(`backoff.maxAttempts must be an integer >= 1 or Infinity, got ${maxAttempts}`);
    }
    const merged = {...DEFAULT_BACKOFF, ...delays};
    for (const [name, value] of Object.entries(merged)) {
      if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
        throw new RangeError(`backoff.${name} must be a finite number >= 0, got ${value}`);
      }
    }
    if (token !== null && typeof token !== "string") {
      throw new TypeError(`token must be a string or null, got ${typeof token}`);
    }
    this.#url = resolveUrl(url);
    this.#subprotocol = subprotocol;
    this.#reconnect = Boolean(reconnect);
    this.#backoff = Object.freeze(merged);
    this.#maxAttempts = maxAttempts;
    this.#token = token;
    this.#queueLimit = queueLimit;
    this.#maxBatch = maxBatch;
    this.#WebSocket = WebSocketImpl;
    this.ready = new Promise((resolve, reject) => {
      this.#resolveReady = resolve;
      this.#rejectReady = reject;
    });
    this.ready.catch(() => {}); // a client nobody awaits must not raise "unhandled rejection"
    this.#open();
  }

  /**
   * Creates a client and waits for its first connection.
   * @returns {Promise<KVMemoClient>}
   * @throws {KVMemoError} when the client closes before it ever connects
   */
  static async connect(url, options = {}) {
    const client = new KVMemoClient(url, options);
    await client.ready;
    return client;
  }

  /** One of the ClientState values. */
  get state() {
    return this.#state;
  }

  /** The WebSocket URL in use. */
  get url() {
    return this.#url;
  }

  /** Calls waiting to be sent. */
  get queued() {
    return this.#outbox.filter((item) => item.entry !== null).length;
  }

  /** Calls sent and waiting for their reply. */
  get inflight() {
    return this.#inflight.size;
  }

  /**
   * Calls `method` with positional `params` (PROTOCOL.md, "Commands").
   *
   * @param {string} method lower-case command name, e.g. "set"
   * @param {...(string|number|bigint)} params strings and finite numbers (a
   *   BigInt is sent as its decimal text); for "transaction", the calls
   * @returns {Promise<any>} the `result`
   * @throws {KVMemoError} (as a rejection) a server error, or DISCONNECTED,
   *   CLOSED, QUEUE_FULL; TypeError for any other param (null, undefined,
   *   NaN, Infinity, a boolean, an object), before anything is sent
   */
  call(method, ...params) {
    return new Promise((resolve, reject) => {
      const id = this.#nextId++;
      this.#enqueue(method, params, id, {method, resolve, reject, seq: 0});
    });
  }

  /**
   * Sends a notification: the server runs it and replies nothing, not even
   * an error. Queued like a call while disconnected.
   *
   * @throws {KVMemoError} CLOSED or QUEUE_FULL, synchronously; TypeError for bad
   *   params (as `call`), synchronously, and nothing is sent
   */
  notify(method, ...params) {
    this.#enqueue(method, params, undefined, null, (error) => {
      throw error;
    });
  }

  /**
   * Closes the client for good: no reconnection, and every call not settled
   * yet rejects with kind CLOSED (one already sent may have been applied).
   *
   * @param {number} [code=1000]
   * @param {string} [reason]
   * @returns {Promise<void>} resolves when the socket is closed (at once when there is
   *   none, as in state "idle" or while waiting to reconnect)
   */
  close(code = 1000, reason = "client closed") {
    const closed = new Promise((resolve) => this.#closedWaiters.push(resolve));
    if (this.#state !== ClientState.CLOSED) {
      this.#shutdown(new KVMemoError("the client was closed", {kind: ClientErrorKind.CLOSED}));
    }
    const ws = this.#ws;
    if (ws === null) {
      this.#settleClosedWaiters();
    } else {
      try {
        ws.close(code, reason);
      } catch (err) {
        // An invalid code or reason: close with the default instead.
        ws.close();
      }
    }
    return closed;
  }

  // ---- convenience methods for the commands of version 1 ----

  /** `PING [message]` → "PONG" or the message. */
  ping(message) {
    return this.#try(() =>
      message === undefined ? this.call("ping") : this.call("ping", asString("message", message)),
    );
  }

  /** `GET key` → value or null. */
  get(key) {
    return this.#try(() => this.call("get", asString("key", key)));
  }

  /**
   * `SET key value [options]` → "OK", null, or the old value with GET.
   * Options as words (`set(k, v, "EX", 10, "NX")`) or one object
   * (`set(k, v, {ex: 10, nx: true})`; keys ex px exat pxat keepttl nx xx get).
   */
  set(key, value, ...options) {
    return this.#try(() => {
      const words =
        options.length === 1 && isPlainObject(options[0]) ? setOptionWords(options[0]) : options.map(asNumberArg);
      return this.call("set", asString("key", key), asString("value", value), ...words);
    });
  }

  /** `DEL key [key ...]` → number of keys removed. */
  del(...keys) {
    return this.#try(() => this.call("del", ...keys.flat().map((k) => asString("key", k))));
  }

  /** `EXISTS key [key ...]` → number of keys that exist. */
  exists(...keys) {
    return this.#try(() => this.call("exists", ...keys.flat().map((k) => asString("key", k))));
  }

  /** `MGET key [key ...]` → array of values or null. Also `mget(["a", "b"])`. */
  mget(...keys) {
    return this.#try(() => this.call("mget", ...keys.flat().map((k) => asString("key", k))));
  }

  /**
   * `MSET key value [key value ...]` → "OK", all-or-nothing.
   * Also `mset({a: "1", b: "2"})` or `mset(new Map(...))`.
   */
  mset(...kv) {
    return this.#try(() => this.call("mset", ...pairWords(kv)));
  }

  /**
   * `MSETNX key value [key value ...]` → 1 if every key was set, 0 if none was
   * (one of them existed). Takes what `mset` takes.
   */
  msetnx(...kv) {
    return this.#try(() => this.call("msetnx", ...pairWords(kv)));
  }

  /** `GETDEL key` → the value (the key is deleted), or null. */
  getdel(key) {
    return this.#try(() => this.call("getdel", asString("key", key)));
  }

  /**
   * `GETEX key [EX s | PX ms | EXAT ts | PXAT ms-ts | PERSIST]` → value or null.
   * Options as words (`getex(k, "EX", 10)`) or one object (`getex(k, {ex: 10})`,
   * `getex(k, {persist: true})`; keys ex px exat pxat persist).
   */
  getex(key, ...options) {
    return this.#try(() => {
      const words =
        options.length === 1 && isPlainObject(options[0]) ? getexOptionWords(options[0]) : options.map(asNumberArg);
      return this.call("getex", asString("key", key), ...words);
    });
  }

  /** `APPEND key value` → the new length, in bytes (UTF-8), not JS characters. */
  append(key, value) {
    return this.#try(() => this.call("append", asString("key", key), asString("value", value)));
  }

  /** `STRLEN key` → the value's length in bytes (UTF-8), 0 if missing. */
  strlen(key) {
    return this.#try(() => this.call("strlen", asString("key", key)));
  }

  /** `TYPE key` → "string" or "none". */
  type(key) {
    return this.#try(() => this.call("type", asString("key", key)));
  }

  /** `KEYS pattern` → every matching key (one reply: prefer `scanIter` on a big keyspace). */
  keys(pattern) {
    return this.#try(() => this.call("keys", asString("pattern", pattern)));
  }

  /** `FLUSHALL [ASYNC|SYNC]` → "OK": deletes every key. */
  flushall(mode) {
    return this.#try(() =>
      mode === undefined || mode === null ? this.call("flushall") : this.call("flushall", asString("mode", mode)),
    );
  }

  /** `SAVE` → "OK" once every shard wrote a snapshot; DISABLED without persistence. */
  save() {
    return this.call("save");
  }

  /** `INCR key` → the new value. */
  incr(key) {
    return this.#try(() => this.call("incr", asString("key", key)));
  }

  /** `DECR key` → the new value. */
  decr(key) {
    return this.#try(() => this.call("decr", asString("key", key)));
  }

  /** `DECRBY key delta` → the new value. */
  decrby(key, delta) {
    return this.#try(() => this.call("decrby", asString("key", key), asNumberArg(delta)));
  }

  /** `INCRBY key delta` → the new value. */
  incrby(key, delta) {
    return this.#try(() => this.call("incrby", asString("key", key), asNumberArg(delta)));
  }

  /** `EXPIRE key seconds [NX|XX|GT|LT]` → 1 or 0. */
  expire(key, seconds, ...options) {
    return this.#try(() => this.call("expire", asString("key", key), asNumberArg(seconds), ...options));
  }

  /** `PEXPIRE key ms [NX|XX|GT|LT]` → 1 or 0. */
  pexpire(key, ms, ...options) {
    return this.#try(() => this.call("pexpire", asString("key", key), asNumberArg(ms), ...options));
  }

  /** `EXPIREAT key unix-seconds [NX|XX|GT|LT]` → 1 or 0. */
  expireat(key, unixSeconds, ...options) {
    return this.#try(() => this.call("expireat", asString("key", key), asNumberArg(unixSeconds), ...options));
  }

  /** `PEXPIREAT key unix-ms [NX|XX|GT|LT]` → 1 or 0 (`Date.now() + ms` fits here). */
  pexpireat(key, unixMs, ...options) {
    return this.#try(() => this.call("pexpireat", asString("key", key), asNumberArg(unixMs), ...options));
  }

  /** `TTL key` → seconds; -1 no timeout; -2 no such key. */
  ttl(key) {
    return this.#try(() => this.call("ttl", asString("key", key)));
  }

  /** `PTTL key` → milliseconds; -1 no timeout; -2 no such key. */
  pttl(key) {
    return this.#try(() => this.call("pttl", asString("key", key)));
  }

  /** `PERSIST key` → 1 if a timeout was removed. */
  persist(key) {
    return this.#try(() => this.call("persist", asString("key", key)));
  }

  /**
   * `SCAN cursor [MATCH pattern] [COUNT n]` → [nextCursor, keys]. Start and
   * end a full iteration with cursor "0".
   * @param {string|number} [cursor="0"]
   * @param {{match?: string, count?: number}} [options]
   */
  scan(cursor = "0", {match, count} = {}) {
    return this.#try(() => {
      const params = [asString("cursor", cursor)];
      if (match !== undefined && match !== null && match !== "") params.push("MATCH", asString("match", match));
      if (count !== undefined && count !== null) params.push("COUNT", asNumberArg(count));
      return this.call("scan", ...params);
    });
  }

  /**
   * Iterates a whole SCAN, yielding each page of keys (a key may appear in
   * more than one page, as with Redis).
   * @param {{match?: string, count?: number}} [options]
   */
  async *scanIter({match, count} = {}) {
    let cursor = "0";
    do {
      const [next, keys] = await this.scan(cursor, {match, count});
      yield keys;
      cursor = String(next);
    } while (cursor !== "0");
  }

  /** `DBSIZE` → number of live keys. */
  dbsize() {
    return this.call("dbsize");
  }

  /** `INFO [section]` → object with sections server, memory, stats, keyspace, actors, persistence. */
  info(section) {
    return section === undefined || section === null ? this.call("info") : this.#try(() => this.call("info", asString("section", section)));
  }

  /**
   * `AUTH token` → "OK". The token accepted is then sent first on every later
   * connection too, as the `token` option's is, so a reconnection stays
   * authenticated (a refused one changes nothing).
   */
  auth(token) {
    return this.#try(() => {
      const text = asString("token", token);
      return this.call("auth", text).then((result) => {
        this.#token = text;
        return result;
      });
    });
  }

  // ---- transactions (version 1.2) ----

  /**
   * Runs `calls` as one atomic step (Redis's MULTI/EXEC): no other request of
   * any session runs between them. Each call is an array `[method, param, ...]`
   * whose params follow the rules of a single call (strings and numbers).
   *
   *     const [ok, n, err] = await kv.transaction(["set", "a", "1"], ["incr", "a"], ["incr", "text"]);
   *     // ok === "OK", n === 2, err instanceof KVMemoError && err.kind === "NOT_INTEGER"
   *
   * A call that fails while the transaction runs does not stop the others and
   * nothing is rolled back: its slot of the result holds a KVMemoError (code,
   * kind, data as for a rejected call) instead of a value. The other slots are
   * the calls' results as `call` would give them.
   *
   * @param {...Array<string|number|bigint>} calls e.g. `["set", "k", "v"]`, `["incr", "n"]`
   * @returns {Promise<Array<any>|null>} one entry per call, in order; null when a
   *   key watched with `watch` was written since (nothing ran: read again and retry)
   * @throws {KVMemoError} (as a rejection) when the transaction is refused as a
   *   whole and nothing ran (a malformed or unknown call, wrong arguments with
   *   `data.index` the call's position, UNAVAILABLE, ...), or DISCONNECTED,
   *   CLOSED, QUEUE_FULL as for any call; TypeError for a malformed call, before
   *   anything is sent
   */
  transaction(...calls) {
    return this.#try(() => {
      const params = calls.map((c, i) => transactionCall(c, i));
      return this.call("transaction", ...params).then((result) => {
        if (result === null) return null;
        if (!Array.isArray(result)) {
          throw new KVMemoError(`transaction result is neither an array nor null: ${JSON.stringify(result)}`, {
            kind: ClientErrorKind.BAD_RESPONSE,
          });
        }
        // In a transaction's result, and only there, a JSON object is a call's error.
        return result.map((entry) =>
          entry !== null && typeof entry === "object" && !Array.isArray(entry) ? KVMemoError.fromWire(entry) : entry,
        );
      });
    });
  }

  /**
   * `WATCH key [key ...]` → "OK": the next `transaction` of this session runs
   * only if none of these keys was written (set, deleted, expired, evicted)
   * since; otherwise it runs nothing and resolves to null. A `transaction` or
   * `unwatch` ends every watch. Also `watch(["a", "b"])`.
   *
   * Watches belong to the server session, that is, to one socket. When the
   * connection is lost and the client reconnects (an "open" event with
   * `reconnected: true`), the new session watches nothing: a `transaction`
   * sent on it runs unconditionally. A watch sent just before the loss rejects
   * DISCONNECTED, but one that had already succeeded is lost silently, so code
   * that may outlive a reconnection must watch (and read) again after one.
   */
  watch(...keys) {
    return this.#try(() => this.call("watch", ...keys.flat().map((k) => asString("key", k))));
  }

  /** `UNWATCH` → "OK": this session watches nothing any more. */
  unwatch() {
    return this.call("unwatch");
  }

  // ---- publish/subscribe (version 1.4) ----

  /**
   * `SUBSCRIBE channel [channel ...]`: `onMessage(data, channel, null)` is
   * called for every message published on these channels, until `unsubscribe`.
   * One callback per channel: subscribing again replaces it. Also
   * `subscribe(["a", "b"], fn)`.
   *
   *     await kv.subscribe("news", (data, channel) => console.log(channel, data));
   *
   * The reply comes before any message of these channels. Messages are
   * strings, decoded by the server as UTF-8 (bad bytes become U+FFFD).
   *
   * @param {string|string[]} channels one name or an array of them (at least one)
   * @param {(data: string, channel: string, pattern: null) => void} onMessage
   * @returns {Promise<Array<[string, string, number]>>} one `["subscribe", channel, count]`
   *   per channel: `count` is the session's subscriptions after it (channels and patterns)
   * @throws {TypeError} (as a rejection) no channel, a bad name, or no callback
   */
  subscribe(channels, onMessage) {
    return this.#subscribe("subscribe", this.#channelHandlers, channels, onMessage);
  }

  /**
   * `PSUBSCRIBE pattern [pattern ...]`: `onMessage(data, channel, pattern)` for
   * every message published on a channel matching one of the glob patterns
   * (Redis's syntax: `*`, `?`, `[a-z]`). A channel that matches a pattern and is
   * also subscribed gets its message twice, once per callback, as in Redis.
   *
   * @param {string|string[]} patterns
   * @param {(data: string, channel: string, pattern: string) => void} onMessage
   * @returns {Promise<Array<[string, string, number]>>} one `["psubscribe", pattern, count]` each
   */
  psubscribe(patterns, onMessage) {
    return this.#subscribe("psubscribe", this.#patternHandlers, patterns, onMessage);
  }

  /**
   * `UNSUBSCRIBE [channel ...]`: stop receiving these channels (every channel
   * when none is named); their callbacks are dropped at once. No message of a
   * channel comes after the reply that left it.
   *
   * @returns {Promise<Array<[string, string|null, number]>>} one `["unsubscribe", channel, count]`
   *   per channel left, or `[["unsubscribe", null, count]]` when there was none
   */
  unsubscribe(...channels) {
    return this.#unsubscribe("unsubscribe", this.#channelHandlers, channels);
  }

  /** `PUNSUBSCRIBE [pattern ...]`: `unsubscribe` for the patterns of `psubscribe`. */
  punsubscribe(...patterns) {
    return this.#unsubscribe("punsubscribe", this.#patternHandlers, patterns);
  }

  /** `PUBLISH channel message` → the number of subscribers that received it. */
  publish(channel, message) {
    return this.#try(() => this.call("publish", asString("channel", channel), asString("message", message)));
  }

  /** The channels with a callback, in subscription order. */
  get channels() {
    return [...this.#channelHandlers.keys()];
  }

  /** The patterns with a callback, in subscription order. */
  get patterns() {
    return [...this.#patternHandlers.keys()];
  }

  #subscribe(method, handlers, names, onMessage) {
    return this.#try(() => {
      const what = method === "subscribe" ? "channel" : "pattern";
      const list = [names].flat().map((name) => asString(what, name));
      if (list.length === 0) throw new TypeError(`${method} needs at least one ${what}`);
      if (typeof onMessage !== "function") {
        throw new TypeError(`${method}: onMessage must be a function, got ${onMessage === null ? "null" : typeof onMessage}`);
      }
      // Set before sending: the server may push a message right after its reply.
      // A refused call puts back the callbacks it replaced (the session keeps those).
      const previous = list.map((name) => handlers.get(name));
      for (const name of list) handlers.set(name, onMessage);
      return this.call(method, ...list).catch((error) => {
        list.forEach((name, i) => {
          if (handlers.get(name) !== onMessage) return;
          if (previous[i] === undefined) handlers.delete(name);
          else handlers.set(name, previous[i]);
        });
        throw error;
      });
    });
  }

  #unsubscribe(method, handlers, names) {
    return this.#try(() => {
      const what = method === "unsubscribe" ? "channel" : "pattern";
      const list = names.flat().map((name) => asString(what, name));
      if (list.length === 0) handlers.clear();
      for (const name of list) handlers.delete(name);
      return this.call(method, ...list);
    });
  }

  // A pushed message (a notification from the server): to its callback and as an event.
  #onPush(push) {
    const {method, params} = push;
    const arity = method === "message" ? 2 : method === "pmessage" ? 3 : 0;
    if (arity === 0) return; // a notification of a later version: ignored
    if (!Array.isArray(params) || params.length !== arity || !params.every((p) => typeof p === "string")) {
      this.#emit("error", {
        error: new KVMemoError(`malformed '${method}' notification: ${JSON.stringify(push)}`, {
          kind: ClientErrorKind.BAD_RESPONSE,
        }),
      });
      return;
    }
    const [pattern, channel, data] = arity === 2 ? [null, ...params] : params;
    const handler = pattern === null ? this.#channelHandlers.get(channel) : this.#patternHandlers.get(pattern);
    if (handler !== undefined) {
      try {
        handler.call(this, data, channel, pattern);
      } catch (err) {
        // Like a DOM event handler: report, do not break the client.
        queueMicrotask(() => {
          throw err;
        });
      }
    }
    this.#emit("message", {channel, data, pattern});
  }

  // After a reconnection: the new session subscribes to what has a callback,
  // before the calls that waited for the connection run (a publish made while
  // disconnected, say, is heard by this session as it would have been).
  #resubscribe() {
    const waiting = this.#outbox;
    this.#outbox = [];
    for (const [method, handlers] of [
      ["subscribe", this.#channelHandlers],
      ["psubscribe", this.#patternHandlers],
    ]) {
      if (handlers.size === 0) continue;
      this.call(method, ...handlers.keys()).catch((error) => {
        this.#emit("error", {
          error: new KVMemoError(`${method} again after a reconnection failed: ${error.message}`, {
            code: error.code,
            kind: error.kind,
            data: error.data,
          }),
        });
      });
    }
    this.#outbox.push(...waiting);
  }

  // ---- internals ----

  // Runs a call builder, turning a synchronous argument error into a rejection.
  #try(build) {
    try {
      return build();
    } catch (err) {
      return Promise.reject(err);
    }
  }

  // Serializes one request and puts it in the outbox. `fail` receives the
  // error when the request cannot be queued (default: reject the call).
  #enqueue(method, params, id, entry, fail = (error) => entry.reject(error)) {
    if (typeof method !== "string" || method === "") {
      fail(new TypeError(`method must be a non-empty string, got ${JSON.stringify(method)}`));
      return;
    }
    if (this.#state === ClientState.CLOSED) {
      fail(this.#closedError());
      return;
    }
    // An idle client, and one opening a socket for the calls made while idle,
    // counts as connected: the server was not lost (see "Idle close").
    const waiting =
      this.#state !== ClientState.OPEN && this.#state !== ClientState.IDLE && !this.#waking;
    if (waiting && this.#outbox.length >= this.#queueLimit) {
      fail(
        new KVMemoError(`'${method}' not sent: ${this.#outbox.length} requests already wait for a connection`, {
          kind: ClientErrorKind.QUEUE_FULL,
        }),
      );
      return;
    }
    let text;
    try {
      const checked = requestParams(method, params);
      const request =
        id === undefined ? {jsonrpc: "2.0", method, params: checked} : {jsonrpc: "2.0", id, method, params: checked};
      text = JSON.stringify(request);
    } catch (err) {
      fail(err instanceof TypeError ? err : new TypeError(`params of '${method}' are not JSON: ${err.message}`));
      return;
    }
    this.#outbox.push({text, entry: entry === null ? null : {...entry, id}});
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      queueMicrotask(() => {
        this.#flushScheduled = false;
        this.#flush();
      });
    }
  }

  #closedError() {
    const cause = this.#closeError;
    return new KVMemoError(cause ? cause.message : "the client is closed", {
      kind: cause ? cause.kind : ClientErrorKind.CLOSED,
      code: cause ? cause.code : null,
      data: cause ? cause.data : null,
    });
  }

  // Sends the whole outbox if the connection is ready; otherwise leaves it
  // (an idle client opens a socket for it).
  #flush() {
    if (this.#state === ClientState.IDLE) {
      if (this.#outbox.length > 0) this.#wake();
      return;
    }
    const ws = this.#ws;
    if (this.#state !== ClientState.OPEN || ws === null || ws.readyState !== WS_OPEN) return;
    while (this.#outbox.length > 0) {
      const chunk = this.#outbox.slice(0, this.#maxBatch);
      const text = chunk.length === 1 ? chunk[0].text : `[${chunk.map((item) => item.text).join(",")}]`;
      try {
        ws.send(text);
      } catch (err) {
        // The socket is closing; its close event will come. Keep the chunk queued.
        return;
      }
      this.#outbox.splice(0, chunk.length);
      const entries = chunk.filter((item) => item.entry !== null).map((item) => item.entry);
      if (entries.length > 0) {
        const seq = this.#nextSeq++;
        this.#messages.set(seq, {size: entries.length, remaining: entries.length, length: chunk.length});
        for (const entry of entries) {
          entry.seq = seq;
          this.#inflight.set(entry.id, entry);
        }
      }
    }
  }

  // The first call after an idle close: a reconnection now, without a delay.
  #wake() {
    this.#state = ClientState.RECONNECTING;
    this.#waking = true;
    this.#attempt = 1;
    this.#open();
    if (this.#state === ClientState.RECONNECTING) this.#emit("reconnecting", {attempt: 1, delayMs: 0});
  }

  #open() {
    this.#reconnectTimer = null;
    let ws;
    try {
      ws = this.#subprotocol ? new this.#WebSocket(this.#url, this.#subprotocol) : new this.#WebSocket(this.#url);
    } catch (err) {
      // A malformed URL or a refused subprotocol name: retrying cannot help.
      const error = new KVMemoError(`cannot open a WebSocket to ${this.#url}: ${err.message}`, {
        kind: ClientErrorKind.CLOSED,
        cause: err,
      });
      this.#emit("error", {error});
      this.#shutdown(error);
      return;
    }
    this.#ws = ws;
    ws.onopen = () => this.#onSocketOpen(ws);
    ws.onmessage = (ev) => this.#onSocketMessage(ws, ev);
    ws.onerror = (ev) => this.#onSocketError(ws, ev);
    ws.onclose = (ev) => this.#onSocketClose(ws, ev);
  }

  #onSocketOpen(ws) {
    if (ws !== this.#ws || this.#state === ClientState.CLOSED) return;
    if (this.#token === null) {
      this.#markOpen();
      return;
    }
    // auth goes first, on its own, and the outbox waits for its reply.
    const id = this.#nextId++;
    const seq = this.#nextSeq++;
    this.#messages.set(seq, {size: 1, remaining: 1, length: 1});
    this.#inflight.set(id, {
      id,
      seq,
      method: "auth",
      resolve: () => {
        if (ws === this.#ws) this.#markOpen();
      },
      reject: (error) => this.#onAuthFailed(ws, error),
    });
    ws.send(JSON.stringify({jsonrpc: "2.0", id, method: "auth", params: [this.#token]}));
  }

  #onAuthFailed(ws, error) {
    if (ws !== this.#ws || error.kind === ClientErrorKind.DISCONNECTED || error.kind === ClientErrorKind.CLOSED) {
      return; // the socket died first; reconnection (or close) handles it
    }
    const failure = new KVMemoError(`authentication failed: ${error.message}`, {
      code: error.code,
      kind: error.kind,
      data: error.data,
    });
    this.#emit("error", {error: failure});
    if (error.kind === "NOAUTH") {
      this.#shutdown(failure); // a wrong token stays wrong
      ws.close(1000, "authentication failed");
    } else {
      ws.close(4000, "authentication failed"); // try again on a new socket
    }
  }

  #markOpen() {
    const reconnected = this.#everOpened;
    this.#state = ClientState.OPEN;
    this.#waking = false;
    this.#everOpened = true;
    this.#attempt = 0;
    this.#resolveReady(this);
    if (reconnected) this.#resubscribe();
    this.#flush();
    this.#emit("open", {reconnected});
  }

  #onSocketMessage(ws, ev) {
    if (ws !== this.#ws) return;
    if (typeof ev.data !== "string") {
      this.#emit("error", {
        error: new KVMemoError("binary message from server ignored", {kind: ClientErrorKind.BAD_RESPONSE}),
      });
      return;
    }
    let message;
    try {
      message = JSON.parse(ev.data);
    } catch (err) {
      this.#emit("error", {
        error: new KVMemoError(`message from server is not JSON: ${err.message}`, {
          kind: ClientErrorKind.BAD_RESPONSE,
        }),
      });
      return;
    }
    if (Array.isArray(message)) {
      for (const response of message) this.#onResponse(response);
    } else {
      this.#onResponse(message);
    }
  }

  #onResponse(response) {
    if (response === null || typeof response !== "object" || Array.isArray(response)) {
      this.#emit("error", {
        error: new KVMemoError(`not a JSON-RPC response: ${JSON.stringify(response)}`, {
          kind: ClientErrorKind.BAD_RESPONSE,
        }),
      });
      return;
    }
    if (!("id" in response) && typeof response.method === "string") {
      this.#onPush(response); // a notification: a pushed message (version 1.4)
      return;
    }
    if (response.id === null || response.id === undefined) {
      this.#onOrphanError(response);
      return;
    }
    const entry = this.#inflight.get(response.id);
    if (entry === undefined) return; // not ours (e.g. a duplicate); nothing waits for it
    this.#inflight.delete(response.id);
    const message = this.#messages.get(entry.seq);
    if (message !== undefined && --message.remaining === 0) this.#messages.delete(entry.seq);
    if (response.error !== undefined && response.error !== null) {
      entry.reject(KVMemoError.fromWire(response.error));
    } else if ("result" in response) {
      entry.resolve(response.result);
    } else {
      entry.reject(
        new KVMemoError(`response to '${entry.method}' has neither result nor error`, {
          kind: ClientErrorKind.BAD_RESPONSE,
        }),
      );
    }
  }

  // An error with id null answers a whole message (see "Whole-message errors").
  #onOrphanError(response) {
    const error = KVMemoError.fromWire(response.error);
    let untouched = [...this.#messages].filter(([, m]) => m.remaining === m.size);
    const length = error.data !== null && typeof error.data === "object" ? error.data.length : undefined;
    if (Number.isInteger(length)) {
      // Several batches may await their replies (pipelined turns, maxBatch
      // chunks): the error names the length of the one it answers. Batches of
      // one length are all over the limit alike; the first sent is answered first.
      untouched = untouched.filter(([, m]) => m.length === length).slice(0, 1);
    }
    if (untouched.length === 1) {
      const [seq] = untouched[0];
      this.#messages.delete(seq);
      for (const [id, entry] of [...this.#inflight]) {
        if (entry.seq === seq) {
          this.#inflight.delete(id);
          entry.reject(KVMemoError.fromWire(response.error));
        }
      }
      return;
    }
    this.#emit("error", {error});
  }

  #onSocketError(ws, ev) {
    if (ws !== this.#ws) return;
    // Browsers say nothing more; the close event that follows does the work.
    this.#emit("error", {
      error: new KVMemoError(`WebSocket error on ${this.#url}`, {kind: ClientErrorKind.DISCONNECTED, data: {event: ev}}),
    });
  }

  #onSocketClose(ws, ev) {
    if (ws !== this.#ws) return;
    this.#ws = null;
    const code = ev && typeof ev.code === "number" ? ev.code : 1006;
    const reason = ev && typeof ev.reason === "string" ? ev.reason : "";
    const wasClean = Boolean(ev && ev.wasClean);
    this.#waking = false;
    // The server's idle close with nothing at stake: reconnect when needed, not now.
    const idle =
      this.#state === ClientState.OPEN &&
      code === IDLE_CLOSE.code &&
      reason === IDLE_CLOSE.reason &&
      this.#inflight.size === 0 &&
      this.#outbox.length === 0 &&
      this.#channelHandlers.size === 0 &&
      this.#patternHandlers.size === 0;
    this.#rejectInflight(
      (method) =>
        new KVMemoError(
          `connection lost (close code ${code}) before the reply to '${method}'; it may or may not have been applied`,
          {kind: ClientErrorKind.DISCONNECTED},
        ),
    );
    if (this.#state === ClientState.CLOSED) {
      this.#emit("close", {code, reason, wasClean, willReconnect: false, idle: false});
      this.#settleClosedWaiters();
      return;
    }
    if (!this.#reconnect) {
      this.#shutdown(
        new KVMemoError(`connection closed (close code ${code}) and reconnect is off`, {
          kind: ClientErrorKind.DISCONNECTED,
        }),
      );
      this.#emit("close", {code, reason, wasClean, willReconnect: false, idle: false});
      this.#settleClosedWaiters();
      return;
    }
    if (idle) {
      this.#state = ClientState.IDLE;
      this.#emit("close", {code, reason, wasClean, willReconnect: true, idle: true});
      return;
    }
    if (this.#attempt >= this.#maxAttempts) {
      this.#shutdown(
        new KVMemoError(
          `gave up connecting to ${this.#url} after ${this.#attempt} attempts in a row (last close code ${code})`,
          {kind: ClientErrorKind.DISCONNECTED},
        ),
      );
      this.#emit("close", {code, reason, wasClean, willReconnect: false, idle: false});
      this.#settleClosedWaiters();
      return;
    }
    this.#state = ClientState.RECONNECTING;
    this.#attempt += 1;
    const attempt = this.#attempt;
    const delayMs = backoffDelay(attempt, this.#backoff);
    this.#reconnectTimer = setTimeout(() => this.#open(), delayMs);
    this.#emit("close", {code, reason, wasClean, willReconnect: true, idle: false});
    if (this.#state === ClientState.RECONNECTING) this.#emit("reconnecting", {attempt, delayMs});
  }

  #rejectInflight(makeError) {
    const entries = [...this.#inflight.values()];
    this.#inflight.clear();
    this.#messages.clear();
    for (const entry of entries) entry.reject(makeError(entry.method));
  }

  // Enters CLOSED for good and fails everything that waits. Idempotent.
  #shutdown(error) {
    if (this.#state === ClientState.CLOSED) return;
    this.#state = ClientState.CLOSED;
    this.#waking = false;
    this.#closeError = error;
    if (this.#reconnectTimer !== null) {
      clearTimeout(this.#reconnectTimer);
      this.#reconnectTimer = null;
    }
    const queued = this.#outbox;
    this.#outbox = [];
    this.#rejectInflight(() => this.#closedError());
    for (const item of queued) if (item.entry !== null) item.entry.reject(this.#closedError());
    this.#rejectReady(this.#closedError());
  }

  #settleClosedWaiters() {
    const waiters = this.#closedWaiters;
    this.#closedWaiters = [];
    for (const resolve of waiters) resolve();
  }

  #emit(type, detail) {
    const event = new KVMemoEvent(type, detail);
    const handler = this[`on${type}`];
    if (typeof handler === "function") {
      try {
        handler.call(this, event);
      } catch (err) {
        // Like a DOM event handler: report, do not break the client.
        queueMicrotask(() => {
          throw err;
        });
      }
    }
    this.dispatchEvent(event);
  }
}

export default KVMemoClient;
