// What the client keeps in localStorage, so that a reload loses nothing:
//   parley.v1.session             {token, user, device} of the logged-in account
//   parley.v1.state:USER:DEVICE   {cursor, outbox, receipts, groups} of that account on this browser
// cursor:   the last ev this page confirmed with `received` (sent as `hello.cursor`)
// outbox:   messages not acked yet, [{id, to, conv, body, t}], resent with the same id
// receipts: {conv: {by: {d: seq, r: seq}}}, the receipt events already confirmed (they are not
//           replayed after the cursor, and history pages carry no status)
// groups:   {"g:…": {name, members, admins}} from group_info

const SESSION = 'parley.v1.session';

function read(key) {
  try {
    const v = localStorage.getItem(key);
    return v ? JSON.parse(v) : null;
  } catch {
    return null; // unreadable or blocked storage: start empty
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false; // quota or privacy mode: the page still works, a reload may lose the outbox
  }
}

export function loadSession() {
  const s = read(SESSION);
  return s && typeof s.token === 'string' && typeof s.user === 'string' ? s : null;
}

export function saveSession(s) {
  write(SESSION, s);
}

export function clearSession() {
  try {
    localStorage.removeItem(SESSION);
  } catch {
    /* nothing to do */
  }
}

/** The persistent state of one account on this browser. `save()` writes it back. */
export class AccountState {
  constructor(user, device) {
    this.key = `parley.v1.state:${user}:${device}`;
    const s = read(this.key) || {};
    this.cursor = Number.isSafeInteger(s.cursor) ? s.cursor : null;
    this.outbox = Array.isArray(s.outbox) ? s.outbox : [];
    this.receipts = s.receipts && typeof s.receipts === 'object' ? s.receipts : {};
    this.groups = s.groups && typeof s.groups === 'object' ? s.groups : {};
  }

  save() {
    write(this.key, { cursor: this.cursor, outbox: this.outbox, receipts: this.receipts, groups: this.groups });
  }

  /** Records a receipt; returns whether it advanced anything. */
  receipt(conv, by, status, upTo) {
    const c = (this.receipts[conv] ||= {});
    const r = (c[by] ||= { d: 0, r: 0 });
    const k = status === 'read' ? 'r' : 'd';
    if (upTo <= r[k]) return false;
    r[k] = upTo;
    return true;
  }

  clear() {
    try {
      localStorage.removeItem(this.key);
    } catch {
      /* nothing to do */
    }
  }
}
