// The WebSocket connection: hello, replies matched by rid, `received` batching, and reconnection
// with jittered exponential backoff that honours the server's `goaway.retry_after_ms`.
//
// States (reported through onStatus): 'connecting' (socket opening, hello sent), 'syncing'
// (welcome received, replaying events), 'online' (synced), 'waiting' (reconnect scheduled at
// `retryAt`), 'paused' (the page was hidden for good or cached: no socket), 'stopped'.

const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 30000;
const OPEN_TIMEOUT_MS = 10000; // socket open + welcome, else try again
const REQUEST_TIMEOUT_MS = 20000;
const RECEIVED_DELAY_MS = 150; // batch `received` for events arriving together

export class Connection {
  /**
   * @param {object} o
   * @param {string} o.url            ws:// or wss:// URL of /v1/ws
   * @param {string} o.token
   * @param {() => number|null} o.cursor   the cursor to send in hello (null: the server's)
   * @param {(f: object) => void} o.onFrame every frame that is not a reply to request()
   * @param {(ev: number) => void} o.onConfirmed after `received` up_to ev was sent
   * @param {(state: string, info: object) => void} o.onStatus
   * @param {() => void} o.onUnauthorized the token is no longer valid (close 4001)
   * @param {() => void} o.onBadCursor    the server refused our cursor (close 4003 after hello)
   */
  constructor(o) {
    Object.assign(this, o);
    this.ws = null;
    this.state = 'stopped';
    this.attempt = 0; // failed attempts since the last synced
    this.goawayMs = 0; // the last goaway's retry_after_ms, honoured by the next reconnect
    this.goawayUntil = 0; // no reconnect before this time (ms), even when the network comes back
    this.timer = null;
    this.openTimer = null;
    this.pending = new Map(); // rid -> {resolve, reject, timer}
    this.nextRid = 1;
    this.toConfirm = 0; // highest ev processed but not yet confirmed
    this.confirmTimer = null;
    this.helloCursor = null;
    this.head = 0;
    this.retryAt = 0;
    this.lastClose = null;
    window.addEventListener('online', () => this.wake());
  }

  start() {
    if (this.state !== 'stopped') return;
    this.connect();
  }

  stop() {
    this.setState('stopped');
    clearTimeout(this.timer);
    clearTimeout(this.openTimer);
    clearTimeout(this.confirmTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, 'logout');
    this.failPending('stopped');
  }

  /**
   * The page is hidden for good or put in the back/forward cache (pagehide): close the socket, so
   * the user goes offline and a cached page holds no connection. `resume()` reconnects.
   */
  pause() {
    if (this.state === 'stopped' || this.state === 'paused') return;
    this.flushConfirm();
    clearTimeout(this.timer);
    clearTimeout(this.openTimer);
    clearTimeout(this.confirmTimer);
    const ws = this.ws;
    this.ws = null;
    this.setState('paused');
    if (ws) ws.close(1000, 'page hidden');
    this.failPending('paused');
  }

  resume() {
    if (this.state === 'paused') this.connect();
  }

  /** Reconnects now when a reconnect is scheduled (the network came back), unless a goaway asked to wait. */
  wake() {
    if (this.state === 'waiting' && Date.now() >= this.goawayUntil) {
      clearTimeout(this.timer);
      this.connect();
    }
  }

  connect() {
    clearTimeout(this.timer);
    this.setState('connecting');
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (e) {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    this.openTimer = setTimeout(() => {
      if (this.ws === ws && this.state === 'connecting') ws.close(4000, 'open timeout');
    }, OPEN_TIMEOUT_MS);
    ws.onopen = () => {
      if (this.ws !== ws) return;
      const hello = { type: 'hello', token: this.token };
      const c = this.cursor();
      if (c !== null && c !== undefined) hello.cursor = c;
      this.helloCursor = hello.cursor ?? null;
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (m) => {
      if (this.ws !== ws || typeof m.data !== 'string') return;
      let f;
      try {
        f = JSON.parse(m.data);
      } catch {
        return;
      }
      this.handle(f);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearTimeout(this.openTimer);
      clearTimeout(this.confirmTimer);
      this.lastClose = { code: e.code, reason: e.reason };
      this.failPending('disconnected');
      if (this.state === 'stopped') return;
      if (e.code === 4001) {
        this.setState('stopped');
        this.onUnauthorized();
        return;
      }
      if (e.code === 4003 && this.helloCursor !== null && this.state === 'connecting') {
        this.toConfirm = 0;
        this.onBadCursor(); // e.g. the server's data was reset: start again from the beginning
      }
      this.scheduleReconnect();
    };
    ws.onerror = () => {
      /* onclose follows */
    };
  }

  handle(f) {
    switch (f.type) {
      case 'welcome':
        clearTimeout(this.openTimer);
        this.head = f.head;
        this.setState('syncing', { welcome: f });
        this.onFrame(f);
        return;
      case 'synced':
        this.attempt = 0;
        this.goawayMs = 0;
        this.flushConfirm();
        this.setState('online');
        this.onFrame(f);
        return;
      case 'goaway':
        // Honoured by the reconnect that follows the close (1001) the server sends next.
        this.goawayMs = Math.max(0, Number(f.retry_after_ms) || 0);
        this.onFrame(f);
        return;
      case 'event':
        this.onFrame(f);
        this.confirm(f.ev);
        return;
      default:
        if (f.rid && this.pending.has(f.rid)) {
          const p = this.pending.get(f.rid);
          this.pending.delete(f.rid);
          clearTimeout(p.timer);
          if (f.type === 'error') p.reject(f);
          else p.resolve(f);
          return;
        }
        this.onFrame(f);
    }
  }

  /** Delay before the next attempt: exponential, jittered, never sooner than a goaway asked. */
  scheduleReconnect() {
    const exp = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** Math.min(this.attempt, 16));
    let delay = exp / 2 + Math.random() * (exp / 2);
    if (this.goawayMs > 0) {
      // The server already spread its clients over a window: wait what it said, plus a little.
      delay = Math.max(delay, this.goawayMs + Math.random() * 250);
      this.goawayUntil = Date.now() + this.goawayMs;
      this.goawayMs = 0;
    } else {
      this.goawayUntil = 0;
    }
    this.attempt += 1;
    this.retryAt = Date.now() + delay;
    this.setState('waiting', { retryAt: this.retryAt });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  setState(s, info = {}) {
    this.state = s;
    this.onStatus(s, info);
  }

  get online() {
    return this.state === 'online';
  }

  /** Sends a frame when the socket is authenticated; returns whether it was sent. */
  send(frame) {
    if (!this.ws || (this.state !== 'online' && this.state !== 'syncing')) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** A request with a rid; resolves with the reply, rejects with the error frame or on disconnect. */
  request(frame) {
    return new Promise((resolve, reject) => {
      const rid = `r${this.nextRid++}`;
      if (!this.send({ ...frame, rid })) {
        reject({ type: 'error', code: 'offline', message: 'not connected' });
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(rid);
        reject({ type: 'error', code: 'timeout', message: 'no reply' });
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(rid, { resolve, reject, timer });
    });
  }

  failPending(code) {
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject({ type: 'error', code, message: code });
    }
    this.pending.clear();
  }

  /** Marks an event as processed; `received` follows shortly (batched). */
  confirm(ev) {
    if (ev > this.toConfirm) this.toConfirm = ev;
    if (!this.confirmTimer) this.confirmTimer = setTimeout(() => this.flushConfirm(), RECEIVED_DELAY_MS);
  }

  flushConfirm() {
    clearTimeout(this.confirmTimer);
    this.confirmTimer = null;
    const upTo = this.toConfirm;
    const c = this.cursor();
    if (upTo > 0 && (c === null || upTo > c) && this.send({ type: 'received', up_to: upTo })) {
      this.onConfirmed(upTo);
    }
  }
}
