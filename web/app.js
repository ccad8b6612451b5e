// parley web: a single-page client of the JSON protocol over /v1/ws (PROTOCOL.md).
//
// State lives in memory (conversations, loaded messages, presence) and, where a reload must not
// lose it, in localStorage (store.js: the cursor, unsent messages, receipts, group names).
// Message bodies only ever reach the page as text nodes.

import { Connection } from './conn.js';
import { AccountState, loadSession, saveSession, clearSession } from './store.js';
import { el, reconcile, tickIcon, TICK_LABEL, fmtTime, fmtDay, fmtListTime, fmtLastSeen, avatar } from './dom.js';

const ID_RE = /^[a-z0-9][a-z0-9_.-]{0,31}$/;
const PAGE = 50; // history page size
const TYPING_REFRESH_MS = 5000; // re-send `composing` while typing (the server expires it after 10 s)
const TYPING_IDLE_MS = 3000; // `paused` after this long without a keystroke
const TYPING_SHOW_MS = 12000; // an incoming `composing` not refreshed is dropped after this long
const RETRYABLE = new Set(['rate_limited', 'overloaded', 'unavailable', 'internal']);
const MAX_BODY_BYTES = 65536;

const $ = (id) => document.getElementById(id);
const utf8 = new TextEncoder();

/** @type {{token: string, user: string, device: string} | null} */
let session = null;
/** @type {AccountState | null} */
let local = null;
/** @type {Connection | null} */
let conn = null;
/** conv id -> Conv (see getConv) */
let convs = new Map();
let openConv = null;
const presence = new Map(); // user -> {online, last_seen}
let watched = null; // the user whose presence we watch (the open dm's peer)
let lastEv = 0; // the highest ev processed by this page
let sentThisConn = new Set(); // outbox ids sent on the current socket
const typingOut = { conv: null, sentAt: 0, idle: null };
let groupRequests = new Set();

// ------------------------------------------------------------------------------------ model

function me() {
  return session.user;
}

function dmConv(a, b) {
  return a <= b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

function isGroup(conv) {
  return conv.startsWith('g:');
}

/** The other user of a dm (the user itself for a dm with itself). */
function peerOf(conv) {
  const [, a, b] = conv.split(':');
  return a === me() ? b : a;
}

function members(c) {
  if (isGroup(c.id)) return local.groups[c.id]?.members || [];
  const [, a, b] = c.id.split(':');
  return a === b ? [a] : [a, b];
}

function title(conv) {
  if (isGroup(conv)) return local.groups[conv]?.name || 'Group';
  const p = peerOf(conv);
  return p === me() ? `${p} (you)` : p;
}

function getConv(id) {
  let c = convs.get(id);
  if (!c) {
    c = {
      id,
      last_seq: 0, // highest seq known
      read_seq: 0, // this user's read marker
      unread: 0,
      last: null, // the last message (for the list)
      msgs: new Map(), // "from\nid" -> {id, from, body, seq, ts, state, t, error}
      oldest: 0, // lowest seq of the contiguous loaded range (history pages and what followed)
      more: true, // older messages exist on the server
      loaded: false, // the newest history page arrived
      loading: false,
      prepended: false, // the last render added older messages at the top (keep the scroll position)
      typing: new Map(), // user -> expiry (ms)
      sentRead: 0,
      t: Date.now(), // for sorting a conversation without messages
      els: new Map(), // message key -> <li>, reused across renders
    };
    convs.set(id, c);
  }
  return c;
}

const keyOf = (from, id) => `${from}\n${id}`;

/** Adds or updates a stored message (from an event, a history page or an ack). */
function addMessage(m, live) {
  const c = getConv(m.conv);
  const key = keyOf(m.from, m.id);
  let msg = c.msgs.get(key);
  if (msg || c.loaded || c.loading) {
    msg ||= {};
    Object.assign(msg, { id: m.id, from: m.from, body: m.body, seq: m.seq, ts: m.ts, state: undefined, error: undefined });
    c.msgs.set(key, msg);
  }
  if (m.from === me()) dropFromOutbox(m.id); // stored: an own message seen in an event or a page
  if (m.seq > c.last_seq) {
    c.last_seq = m.seq;
    if (live && m.from !== me() && m.seq > c.read_seq) c.unread += 1;
  }
  if (!c.last || m.seq >= c.last.seq) c.last = { ...m };
  if (live && m.from !== me()) c.typing.delete(m.from);
}

function dropFromOutbox(id) {
  const i = local.outbox.findIndex((o) => o.id === id);
  if (i >= 0) {
    local.outbox.splice(i, 1);
    local.save();
  }
}

/** The status of an own message: sending, sent, delivered, read or failed. */
function tickState(c, m) {
  if (m.state === 'pending') return 'sending';
  if (m.state === 'failed') return 'failed';
  const others = members(c).filter((u) => u !== me());
  if (!others.length) return 'sent';
  const rc = local.receipts[c.id] || {};
  let read = true;
  let delivered = true;
  for (const u of others) {
    const r = rc[u] || { d: 0, r: 0 };
    if (r.r < m.seq) read = false;
    if (Math.max(r.d, r.r) < m.seq) delivered = false;
  }
  return read ? 'read' : delivered ? 'delivered' : 'sent';
}

function newId() {
  const b = crypto.getRandomValues(new Uint8Array(10));
  return `w${Date.now().toString(36)}${Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('')}`;
}

// ------------------------------------------------------------------------------------ frames

function onFrame(f) {
  switch (f.type) {
    case 'welcome':
      sentThisConn = new Set();
      break;
    case 'synced':
      onSynced();
      break;
    case 'event':
      onEvent(f);
      break;
    case 'ack':
      onAck(f);
      break;
    case 'typing':
      onTyping(f);
      break;
    case 'presence':
      presence.set(f.user, { online: f.online, last_seen: f.last_seen });
      scheduleRender();
      break;
    case 'error':
      onError(f);
      break;
    default:
      break;
  }
}

function onSynced() {
  for (const o of local.outbox) sendOutboxItem(o);
  refreshConversations();
  if (openConv) {
    const c = getConv(openConv);
    if (!c.loaded && !c.loading) loadNewest(c);
    if (isGroup(openConv)) refreshGroup(openConv);
  }
  if (watched) conn.send({ type: 'watch', users: [watched] });
  maybeRead();
  scheduleRender();
}

function onEvent(f) {
  if (f.ev <= lastEv) return; // replayed after a reconnect: already applied
  lastEv = f.ev;
  switch (f.kind) {
    case 'message':
      addMessage(f.message, true);
      if (f.message.conv === openConv) maybeRead();
      break;
    case 'receipt': {
      const r = f.receipt;
      local.receipt(r.conv, r.by, r.status, r.up_to);
      if (r.status === 'read') local.receipt(r.conv, r.by, 'delivered', r.up_to);
      getConv(r.conv);
      break;
    }
    case 'group': {
      const g = f.group;
      const c = getConv(g.group);
      if (g.action === 'created') c.t = Math.max(c.t, Date.now());
      if (conn.online) refreshGroup(g.group);
      break;
    }
    case 'read_marker': {
      const m = f.read_marker;
      const c = getConv(m.conv);
      if (m.seq > c.read_seq) {
        c.read_seq = m.seq;
        if (m.seq >= c.last_seq) c.unread = 0;
        else if (conn.online) refreshConversations();
      }
      break;
    }
    default:
      break;
  }
  scheduleRender();
}

function onAck(f) {
  const item = local.outbox.find((o) => o.id === f.id);
  const conv = item?.conv || f.conv;
  const known = getConv(conv).msgs.get(keyOf(me(), f.id));
  const body = item ? item.body : known?.body;
  if (body !== undefined) addMessage({ conv, seq: f.seq, id: f.id, from: me(), body, ts: f.ts }, false);
  dropFromOutbox(f.id);
  scheduleRender();
}

function onError(f) {
  if (!f.id) {
    console.warn('parley:', f.code, f.message);
    return;
  }
  const item = local.outbox.find((o) => o.id === f.id);
  if (!item) return;
  if (RETRYABLE.has(f.code)) {
    sentThisConn.delete(item.id);
    setTimeout(() => {
      if (conn?.online && local.outbox.includes(item)) sendOutboxItem(item);
    }, 1000 + Math.random() * 2000);
    return;
  }
  dropFromOutbox(item.id);
  const m = getConv(item.conv).msgs.get(keyOf(me(), item.id));
  if (m) {
    m.state = 'failed';
    m.error = f.code === 'unknown_user' ? `no user "${item.to}" on this server` : f.message || f.code;
  }
  scheduleRender();
}

function onTyping(f) {
  if (f.from === me()) return;
  const c = getConv(f.conv);
  if (f.state === 'composing') {
    c.typing.set(f.from, Date.now() + TYPING_SHOW_MS);
    setTimeout(scheduleRender, TYPING_SHOW_MS + 50);
  } else {
    c.typing.delete(f.from);
  }
  scheduleRender();
}

function typingUsers(c) {
  const now = Date.now();
  for (const [u, exp] of c.typing) if (exp <= now) c.typing.delete(u);
  return [...c.typing.keys()];
}

// ------------------------------------------------------------------------------------ requests

let convRefresh = null;
function refreshConversations() {
  if (convRefresh) return;
  convRefresh = conn
    .request({ type: 'conversations' })
    .then((r) => {
      for (const it of r.items) {
        const c = getConv(it.conv);
        c.last_seq = Math.max(c.last_seq, it.last_seq);
        c.read_seq = Math.max(c.read_seq, it.read_seq);
        c.unread = it.unread;
        if (it.last && (!c.last || it.last.seq >= c.last.seq)) c.last = it.last;
        if (isGroup(it.conv) && !local.groups[it.conv]) refreshGroup(it.conv);
      }
      maybeRead();
      scheduleRender();
    })
    .catch((e) => console.warn('parley: conversations', e.code))
    .finally(() => {
      convRefresh = null;
    });
}

function refreshGroup(g) {
  if (groupRequests.has(g) || !conn.online) return;
  groupRequests.add(g);
  conn
    .request({ type: 'group_info', group: g })
    .then((r) => {
      local.groups[g] = { name: r.name, members: r.members || [], admins: r.admins || [] };
      local.save();
      scheduleRender();
    })
    .catch((e) => {
      if (e.code === 'not_member' && local.groups[g]) {
        local.groups[g].left = true;
        local.save();
      }
    })
    .finally(() => groupRequests.delete(g));
}

function loadNewest(c) {
  if (!conn.online) return;
  c.loading = true;
  renderHistoryStatus();
  conn
    .request({ type: 'history', conv: c.id, limit: PAGE })
    .then((r) => {
      for (const m of r.messages) addMessage(m, false);
      c.oldest = r.messages.length ? r.messages[0].seq : 1;
      c.more = r.more;
      c.loaded = true;
    })
    .catch((e) => console.warn('parley: history', e.code))
    .finally(() => {
      c.loading = false;
      c.scrollToEnd = true;
      maybeRead();
      scheduleRender();
    });
}

function loadOlder(c) {
  if (!c.loaded || c.loading || !c.more || !conn.online) return;
  c.loading = true;
  renderHistoryStatus();
  conn
    .request({ type: 'history', conv: c.id, before: c.oldest, limit: PAGE })
    .then((r) => {
      for (const m of r.messages) addMessage(m, false);
      if (r.messages.length) c.oldest = Math.min(c.oldest, r.messages[0].seq);
      c.more = r.more;
      c.prepended = true;
    })
    .catch((e) => console.warn('parley: history', e.code))
    .finally(() => {
      c.loading = false;
      scheduleRender();
    });
}

/** Sends `read` for the open conversation when the page is visible and others' messages are unread. */
function maybeRead() {
  if (!openConv || !conn?.online || document.visibilityState !== 'visible') return;
  const c = getConv(openConv);
  if (!c.loaded) return;
  let newestOther = 0;
  for (const m of c.msgs.values()) if (m.seq && m.from !== me() && m.seq > newestOther) newestOther = m.seq;
  if (newestOther <= c.read_seq || c.last_seq <= c.sentRead) return;
  c.sentRead = c.last_seq;
  conn.send({ type: 'read', conv: c.id, seq: c.last_seq });
  c.read_seq = c.last_seq;
  c.unread = 0;
  scheduleRender();
}

// ------------------------------------------------------------------------------------ sending

function sendOutboxItem(o) {
  if (sentThisConn.has(o.id)) return;
  if (conn.send({ type: 'send', id: o.id, to: o.to, body: o.body })) sentThisConn.add(o.id);
}

function sendMessage(body) {
  const c = getConv(openConv);
  const to = isGroup(c.id) ? c.id : peerOf(c.id);
  const item = { id: newId(), to, conv: c.id, body, t: Date.now() };
  local.outbox.push(item); // persisted before it goes out: a reload resends it with this id
  local.save();
  c.msgs.set(keyOf(me(), item.id), { id: item.id, from: me(), body, state: 'pending', t: item.t });
  c.scrollToEnd = true;
  render(); // the clock is on screen before the frame leaves
  if (conn.online) sendOutboxItem(item);
}

function composing() {
  if (!openConv || !conn?.online) return;
  const now = Date.now();
  if (typingOut.conv !== openConv || now - typingOut.sentAt > TYPING_REFRESH_MS) {
    if (typingOut.conv && typingOut.conv !== openConv) stopTyping();
    conn.send({ type: 'typing', conv: openConv, state: 'composing' });
    typingOut.conv = openConv;
    typingOut.sentAt = now;
  }
  clearTimeout(typingOut.idle);
  typingOut.idle = setTimeout(stopTyping, TYPING_IDLE_MS);
}

function stopTyping() {
  clearTimeout(typingOut.idle);
  if (typingOut.conv && conn?.online) conn.send({ type: 'typing', conv: typingOut.conv, state: 'paused' });
  typingOut.conv = null;
  typingOut.sentAt = 0;
}

// ------------------------------------------------------------------------------------ rendering

let renderTimer = null;
function scheduleRender() {
  if (!renderTimer) renderTimer = setTimeout(render, 16);
}

function render() {
  clearTimeout(renderTimer);
  renderTimer = null;
  if (!session || !local) return;
  renderList();
  renderChat();
  renderConn();
  const unread = [...convs.values()].reduce((n, c) => n + (c.unread > 0 ? 1 : 0), 0);
  document.title = unread ? `(${unread}) parley` : 'parley';
}

function activity(c) {
  let t = c.last?.ts || 0;
  for (const m of c.msgs.values()) if (!m.seq && m.t > t) t = m.t;
  return t || c.t;
}

function preview(c) {
  const typing = typingUsers(c);
  if (typing.length) {
    return el('span', { class: 'preview typing' }, isGroup(c.id) ? `${typing.join(', ')} typing…` : 'typing…');
  }
  let last = c.last;
  for (const m of c.msgs.values()) if (!m.seq && (!last || !last.seq || m.t > (last.t || 0))) last = { ...m, pending: true };
  if (!last) return el('span', { class: 'preview muted' }, isGroup(c.id) ? 'No messages yet' : 'Say hi');
  const own = last.from === me();
  const line = String(last.body).split('\n', 1)[0];
  const state = own ? tickState(c, last) : null;
  return el(
    'span',
    { class: 'preview' },
    state ? el('span', { class: 'tick', 'data-state': state, role: 'img', 'aria-label': TICK_LABEL[state] }, tickIcon(state)) : null,
    own ? 'You: ' : isGroup(c.id) ? `${last.from}: ` : '',
    el('bdi', {}, line),
  );
}

/** conv id -> {li, button, sig}: list items are kept and updated, not rebuilt, on each render. */
let listItems = new Map();

function renderList() {
  const list = $('convs');
  const items = [...convs.values()].sort((a, b) => activity(b) - activity(a));
  const lis = items.map((c) => {
    const time = c.last?.ts ? fmtListTime(c.last.ts) : '';
    const unread = c.unread > 0 && c.id !== openConv ? c.unread : 0;
    const pv = preview(c);
    const active = c.id === openConv;
    const sig = JSON.stringify([title(c.id), time, unread, active, pv.outerHTML]);
    let it = listItems.get(c.id);
    if (!it) {
      const button = el('button', { type: 'button', class: 'conv' });
      it = { li: el('li', { 'data-conv': c.id }, button), button, sig: '' };
      listItems.set(c.id, it);
    }
    if (it.sig !== sig) {
      it.sig = sig;
      it.li.classList.toggle('active', active);
      if (active) it.button.setAttribute('aria-current', 'true');
      else it.button.removeAttribute('aria-current');
      it.button.replaceChildren(
        avatar(title(c.id)),
        el(
          'span',
          { class: 'conv-main' },
          el('span', { class: 'conv-top' }, el('span', { class: 'conv-title', dir: 'auto' }, title(c.id)), el('time', { class: 'conv-time' }, time)),
          el(
            'span',
            { class: 'conv-bottom' },
            pv,
            unread ? el('span', { class: 'unread', title: `${unread} unread`, 'aria-label': `${unread} unread` }, String(unread)) : null,
          ),
        ),
      );
    }
    return it.li;
  });
  reconcile(list, lis);
  $('convs-empty').hidden = lis.length > 0;
}

function headerStatus(c) {
  const typing = typingUsers(c);
  if (typing.length) return { text: isGroup(c.id) ? `${typing.join(', ')} ${typing.length > 1 ? 'are' : 'is'} typing…` : 'typing…', typing: true };
  if (isGroup(c.id)) {
    const g = local.groups[c.id];
    if (!g) return { text: '' };
    if (g.left) return { text: 'You are no longer a member' };
    const names = g.members.map((u) => (u === me() ? 'You' : u));
    return { text: names.join(', ') };
  }
  const p = peerOf(c.id);
  if (p === me()) return { text: 'Message yourself' };
  return { text: fmtLastSeen(presence.get(p)) };
}

function renderChat() {
  const c = openConv ? getConv(openConv) : null;
  $('chat-empty').hidden = !!c;
  $('chat-header').hidden = !c;
  $('composer').hidden = !c;
  $('scroller').hidden = !c;
  $('app').dataset.view = c ? 'chat' : 'list';
  if (!c) {
    $('members').hidden = true;
    return;
  }
  $('chat-avatar').replaceChildren(avatar(title(c.id)));
  $('chat-title').textContent = title(c.id);
  const st = headerStatus(c);
  $('chat-status').textContent = st.text;
  $('chat-status').classList.toggle('typing', !!st.typing);
  const group = isGroup(c.id);
  $('members-btn').hidden = !group;
  if (!group) $('members').hidden = true;
  renderMembers(c);
  renderMessages(c);
  renderHistoryStatus();
}

function renderMembers(c) {
  const g = local.groups[c.id];
  const ul = $('members-list');
  if (!g) {
    ul.replaceChildren();
    return;
  }
  $('members-btn').textContent = `Members (${g.members.length})`;
  ul.replaceChildren(
    ...g.members.map((u) =>
      el('li', { 'data-user': u }, avatar(u), el('span', {}, u === me() ? `${u} (you)` : u), g.admins.includes(u) ? el('span', { class: 'badge' }, 'admin') : null),
    ),
  );
}

function renderHistoryStatus() {
  const c = openConv ? getConv(openConv) : null;
  const s = $('history-status');
  if (!c) return;
  if (c.loading) s.textContent = c.loaded ? 'Loading older messages…' : 'Loading messages…';
  else if (c.loaded && !c.more) s.textContent = c.msgs.size ? 'Beginning of the conversation' : 'No messages yet';
  else s.textContent = '';
}

function messageEl(c, m) {
  const key = keyOf(m.from, m.id);
  let li = c.els.get(key);
  const own = m.from === me();
  if (!li) {
    li = el(
      'li',
      { class: own ? 'msg own' : 'msg', 'data-id': m.id, 'data-from': m.from },
      el(
        'div',
        { class: 'bubble' },
        !own && isGroup(c.id) ? el('span', { class: 'from' }, m.from) : null,
        el('p', { class: 'body', dir: 'auto' }, m.body), // text, never markup
        el('span', { class: 'meta' }, el('time', { class: 'time' }), own ? el('span', { class: 'tick' }) : null),
      ),
    );
    c.els.set(key, li);
  }
  if (m.seq) li.dataset.seq = String(m.seq);
  const ts = m.ts || m.t;
  const time = li.querySelector('.time');
  time.textContent = fmtTime(ts);
  time.dateTime = new Date(ts).toISOString();
  if (own) {
    const state = tickState(c, m);
    const tick = li.querySelector('.tick');
    if (tick.dataset.state !== state) {
      tick.dataset.state = state;
      tick.setAttribute('role', 'img');
      tick.setAttribute('aria-label', TICK_LABEL[state]);
      tick.title = state === 'failed' ? `Not sent: ${m.error}` : TICK_LABEL[state];
      tick.replaceChildren(tickIcon(state));
    }
  }
  return li;
}

function renderMessages(c) {
  const ol = $('messages');
  const scroller = $('scroller');
  const switched = ol.dataset.conv !== c.id;
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 60;
  const before = scroller.scrollHeight;
  const top = scroller.scrollTop;
  const shown = [];
  const pending = [];
  for (const m of c.msgs.values()) {
    if (m.seq) {
      if (c.loaded && m.seq >= c.oldest) shown.push(m);
    } else pending.push(m);
  }
  shown.sort((a, b) => a.seq - b.seq);
  pending.sort((a, b) => a.t - b.t);
  const out = [];
  let day = null;
  for (const m of shown.concat(pending)) {
    const d = fmtDay(m.ts || m.t);
    if (d !== day) {
      const key = `day\n${d}`;
      if (!c.els.has(key)) c.els.set(key, el('li', { class: 'day', role: 'separator' }, el('span', {}, d)));
      out.push(c.els.get(key));
      day = d;
    }
    out.push(messageEl(c, m));
  }
  reconcile(ol, out);
  ol.dataset.conv = c.id;
  if (c.prepended && !switched) {
    scroller.scrollTop = top + (scroller.scrollHeight - before);
  } else if (switched || atBottom || c.scrollToEnd) {
    scroller.scrollTop = scroller.scrollHeight;
  }
  c.prepended = false;
  c.scrollToEnd = false;
  // A first page that does not fill the view has no scroll bar to pull older pages with.
  if (c.loaded && c.more && !c.loading && scroller.scrollHeight <= scroller.clientHeight + 10) loadOlder(c);
}

// ------------------------------------------------------------------------------------ UI actions

function openChat(id) {
  if (openConv !== id) stopTyping();
  openConv = id;
  rememberOpen(id);
  const c = getConv(id);
  c.scrollToEnd = true;
  $('members').hidden = true;
  $('members-btn').setAttribute('aria-expanded', 'false');
  if (!c.loaded && !c.loading) loadNewest(c);
  if (isGroup(id)) refreshGroup(id);
  const peer = isGroup(id) ? null : peerOf(id);
  setWatch(peer && peer !== me() ? peer : null);
  render();
  $('compose').focus();
  maybeRead();
}

function closeChat() {
  stopTyping();
  openConv = null;
  rememberOpen(null);
  setWatch(null);
  render();
  $('convs').querySelector('button')?.focus();
}

/** The open conversation survives a reload of this tab (sessionStorage: per tab, not per browser). */
function rememberOpen(id) {
  try {
    if (id) sessionStorage.setItem('parley.open', id);
    else sessionStorage.removeItem('parley.open');
  } catch {
    /* storage blocked: a reload shows the list */
  }
}

function reopen() {
  let id = null;
  try {
    id = sessionStorage.getItem('parley.open');
  } catch {
    return;
  }
  if (id && /^(dm:[a-z0-9][a-z0-9_.-]{0,31}:[a-z0-9][a-z0-9_.-]{0,31}|g:[a-z0-9_.-]{1,64})$/.test(id) && (isGroup(id) || id.split(':').includes(me()))) openChat(id);
}

function setWatch(user) {
  if (watched === user) return;
  if (watched && conn?.online) conn.send({ type: 'unwatch', users: [watched] });
  watched = user;
  if (user && conn?.online) conn.send({ type: 'watch', users: [user] });
}

function onStatus(state, info) {
  document.body.dataset.conn = state;
  renderConn();
  if (state === 'waiting') {
    clearInterval(connTicker);
    connTicker = setInterval(renderConn, 1000);
  } else {
    clearInterval(connTicker);
  }
  void info;
}

let connTicker = null;
function renderConn() {
  const box = $('conn');
  if (!conn) return;
  const waiting = local ? local.outbox.length : 0;
  const queued = waiting ? ` ${waiting} message${waiting > 1 ? 's' : ''} waiting to be sent.` : '';
  switch (conn.state) {
    case 'online':
      box.replaceChildren();
      box.hidden = true;
      return;
    case 'connecting':
      box.replaceChildren(`Connecting…${queued}`);
      break;
    case 'syncing':
      box.replaceChildren(`Syncing…${queued}`);
      break;
    case 'waiting': {
      const s = Math.max(0, Math.ceil((conn.retryAt - Date.now()) / 1000));
      const retry = el('button', { type: 'button', class: 'link' }, 'Retry now');
      retry.addEventListener('click', () => conn.wake());
      box.replaceChildren(`Offline. Reconnecting in ${s} s.${queued} `, retry);
      break;
    }
    default:
      box.replaceChildren('Disconnected.');
  }
  box.hidden = false;
}

// ------------------------------------------------------------------------------------ auth

function defaultDevice() {
  const ua = navigator.userAgent;
  const browser = /Edg\//.test(ua)
    ? 'edge'
    : /OPR\//.test(ua)
      ? 'opera'
      : /Firefox\//.test(ua)
        ? 'firefox'
        : /Chrom(e|ium)\//.test(ua)
          ? 'chrome'
          : /Safari\//.test(ua)
            ? 'safari'
            : 'browser';
  const os = /Android/.test(ua)
    ? 'android'
    : /iPhone|iPad|iPod/.test(ua)
      ? 'ios'
      : /Windows/.test(ua)
        ? 'windows'
        : /Mac OS X/.test(ua)
          ? 'mac'
          : /CrOS/.test(ua)
            ? 'chromeos'
            : /Linux/.test(ua)
              ? 'linux'
              : '';
  return os ? `${browser}-${os}` : browser;
}

async function postJson(path, body, token) {
  const headers = { 'Content-Type': 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  let r;
  try {
    r = await fetch(path, { method: 'POST', headers, body: body ? JSON.stringify(body) : undefined });
  } catch {
    throw { error: 'network', message: 'Cannot reach the server.' };
  }
  const text = await r.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    /* not JSON */
  }
  if (!r.ok) throw json && json.error ? json : { error: `http_${r.status}`, message: `The server answered ${r.status}.` };
  return json;
}

const AUTH_ERRORS = {
  user_exists: 'That user id is taken. Log in instead, or pick another id.',
  unauthorized: 'Wrong user id or password.',
  rate_limited: 'Too many attempts. Wait a minute and try again.',
  registration_closed: 'This server does not accept new accounts.',
};

async function onAuthSubmit(e) {
  e.preventDefault();
  const action = e.submitter?.value === 'register' ? 'register' : 'login';
  const user = $('user').value.trim().toLowerCase();
  const password = $('password').value;
  const device = $('device').value.trim().toLowerCase() || defaultDevice();
  const err = $('auth-error');
  err.textContent = '';
  if (!ID_RE.test(user)) {
    err.textContent = 'A user id is 1-32 characters: a-z, 0-9, _ . - (starting with a letter or digit).';
    $('user').focus();
    return;
  }
  const plen = utf8.encode(password).length;
  if (plen < 8 || plen > 256) {
    err.textContent = 'A password is 8 to 256 bytes long.';
    $('password').focus();
    return;
  }
  if (!ID_RE.test(device)) {
    err.textContent = 'A device name is 1-32 characters: a-z, 0-9, _ . -';
    $('device').focus();
    return;
  }
  const buttons = document.querySelectorAll('#auth-form button');
  buttons.forEach((b) => (b.disabled = true));
  try {
    if (action === 'register') await postJson('/v1/register', { user, password });
    const s = await postJson('/v1/login', { user, password, device });
    session = { token: s.token, user: s.user, device: s.device };
    saveSession(session);
    $('password').value = '';
    startApp();
  } catch (x) {
    err.textContent = AUTH_ERRORS[x.error] || x.message || 'Something went wrong.';
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

function showAuth(message) {
  $('app').hidden = true;
  $('auth').hidden = false;
  $('auth-error').textContent = message || '';
  if (!$('device').value) $('device').value = defaultDevice();
  (session?.user ? $('password') : $('user')).focus();
}

async function logout() {
  const waiting = local.outbox.length;
  if (waiting && !confirm(`${waiting} message${waiting > 1 ? 's are' : ' is'} not sent yet and will be lost. Log out anyway?`)) return;
  const token = session.token;
  teardown();
  local.clear();
  clearSession();
  try {
    await postJson('/v1/logout', null, token);
  } catch {
    /* the token dies with the session anyway */
  }
  local = null;
  showAuth();
}

function teardown() {
  stopTyping();
  rememberOpen(null);
  conn?.stop();
  conn = null;
  convs = new Map();
  openConv = null;
  watched = null;
  lastEv = 0;
  presence.clear();
  groupRequests = new Set();
  listItems = new Map();
}

function startApp() {
  local = new AccountState(session.user, session.device);
  convs = new Map();
  listItems = new Map();
  openConv = null;
  lastEv = 0;
  for (const o of local.outbox) {
    getConv(o.conv).msgs.set(keyOf(session.user, o.id), { id: o.id, from: session.user, body: o.body, state: 'pending', t: o.t });
  }
  for (const g of Object.keys(local.groups)) getConv(g);
  $('auth').hidden = true;
  $('app').hidden = false;
  $('me').textContent = session.user;
  $('me-device').textContent = session.device;
  $('me-avatar').replaceChildren(avatar(session.user));
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  conn = new Connection({
    url: `${proto}//${location.host}/v1/ws`,
    token: session.token,
    cursor: () => local.cursor ?? 0, // a new browser replays the stream (receipts included)
    onFrame,
    onConfirmed: (ev) => {
      local.cursor = ev;
      local.save(); // receipts and groups of these events, with the cursor
    },
    onStatus,
    onUnauthorized: () => {
      teardown();
      clearSession();
      const user = session.user;
      session = null;
      $('user').value = user;
      showAuth('Your session has ended. Log in again.');
    },
    onBadCursor: () => {
      local.cursor = null;
      local.receipts = {};
      local.save();
      lastEv = 0;
    },
  });
  conn.start();
  render();
  reopen();
}

function splitIds(s) {
  return s
    .split(/[\s,]+/)
    .map((x) => x.trim().toLowerCase())
    .filter(Boolean);
}

function togglePanel(btn, panel, focus) {
  const open = panel.hidden;
  for (const [b, p] of [
    ['new-chat-btn', 'new-chat'],
    ['new-group-btn', 'new-group'],
  ]) {
    $(p).hidden = true;
    $(b).setAttribute('aria-expanded', 'false');
  }
  panel.hidden = !open;
  btn.setAttribute('aria-expanded', String(open));
  if (open) focus.focus();
}

function wire() {
  $('auth-form').addEventListener('submit', onAuthSubmit);
  $('logout').addEventListener('click', logout);
  $('new-chat-btn').addEventListener('click', () => togglePanel($('new-chat-btn'), $('new-chat'), $('peer')));
  $('new-group-btn').addEventListener('click', () => togglePanel($('new-group-btn'), $('new-group'), $('group-name')));
  $('new-chat').addEventListener('submit', (e) => {
    e.preventDefault();
    const peer = $('peer').value.trim().toLowerCase();
    if (!ID_RE.test(peer)) {
      $('new-chat-error').textContent = 'A user id is 1-32 characters: a-z, 0-9, _ . -';
      return;
    }
    $('new-chat-error').textContent = '';
    $('peer').value = '';
    togglePanel($('new-chat-btn'), $('new-chat'), $('peer'));
    openChat(dmConv(me(), peer));
  });
  $('new-group').addEventListener('submit', async (e) => {
    e.preventDefault();
    const name = $('group-name').value.trim();
    const ids = splitIds($('group-members').value);
    const bad = ids.find((u) => !ID_RE.test(u));
    const errBox = $('new-group-error');
    if (!name || name.length > 100) return void (errBox.textContent = 'A group name is 1 to 100 characters.');
    if (bad) return void (errBox.textContent = `"${bad}" is not a user id.`);
    errBox.textContent = '';
    try {
      const r = await conn.request({ type: 'group_create', name, members: ids.filter((u) => u !== me()) });
      local.groups[r.group] = { name, members: [me(), ...ids.filter((u) => u !== me())], admins: [me()] };
      local.save();
      getConv(r.group).t = Date.now();
      $('group-name').value = '';
      $('group-members').value = '';
      togglePanel($('new-group-btn'), $('new-group'), $('group-name'));
      openChat(r.group);
    } catch (x) {
      errBox.textContent = x.code === 'offline' ? 'Not connected; try again when online.' : `Could not create the group: ${x.message || x.code}`;
    }
  });
  $('convs').addEventListener('click', (e) => {
    const li = e.target.closest('li[data-conv]');
    if (li) openChat(li.dataset.conv);
  });
  $('back').addEventListener('click', closeChat);
  $('members-btn').addEventListener('click', () => {
    const m = $('members');
    m.hidden = !m.hidden;
    $('members-btn').setAttribute('aria-expanded', String(!m.hidden));
  });
  const compose = $('compose');
  compose.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $('composer').requestSubmit();
    } else if (e.key === 'Escape') {
      closeChat();
    }
  });
  compose.addEventListener('input', () => {
    autosize(compose);
    if (compose.value === '') stopTyping();
    else composing();
  });
  $('composer').addEventListener('submit', (e) => {
    e.preventDefault();
    const body = compose.value;
    if (!openConv || body.trim() === '') return;
    if (utf8.encode(body).length > MAX_BODY_BYTES) {
      compose.setCustomValidity('A message is at most 64 KiB.');
      compose.reportValidity();
      return;
    }
    compose.setCustomValidity('');
    stopTyping();
    sendMessage(body);
    compose.value = '';
    autosize(compose);
    compose.focus();
  });
  $('scroller').addEventListener('scroll', () => {
    if (openConv && $('scroller').scrollTop < 80) loadOlder(getConv(openConv));
  });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') {
      maybeRead();
      conn?.wake();
    } else {
      stopTyping();
    }
  });
  window.addEventListener('focus', maybeRead);
  // Leaving the page (or entering the back/forward cache) closes the socket; coming back reconnects.
  window.addEventListener('pagehide', () => {
    stopTyping();
    conn?.pause();
  });
  window.addEventListener('pageshow', (e) => {
    if (e.persisted) conn?.resume();
  });
}

/**
 * Fits the compose box to its text (up to 160 px). Runs on every keystroke, so it measures first
 * and touches the height only when the text overflows or may have become shorter: resetting the
 * height lays out the whole chat again (twice), which made each keystroke cost more the longer
 * the chat was.
 */
const composeLength = new WeakMap(); // textarea -> value length at the last autosize
function autosize(t) {
  const shorter = t.value.length < (composeLength.get(t) ?? 0);
  composeLength.set(t, t.value.length);
  if (!shorter && t.scrollHeight <= t.clientHeight) return;
  t.style.height = 'auto';
  t.style.height = `${Math.min(t.scrollHeight, 160)}px`;
}

wire();
session = loadSession();
if (session) startApp();
else showAuth();
