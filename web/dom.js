// Small DOM helpers. Text always goes in as text nodes (textContent), never as markup: nothing in
// this client parses a string into HTML.

/**
 * Creates an element. `attrs` sets attributes (class, dir, data-*, aria-*...; `false`/null skip);
 * children are nodes or strings (strings become text nodes).
 */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(typeof c === 'string' ? document.createTextNode(c) : c);
  }
  return e;
}

/**
 * Makes `parent`'s children exactly `nodes`, in order, moving only the nodes out of place: nodes
 * that stay keep their focus, text selection and hover state across renders.
 */
export function reconcile(parent, nodes) {
  let ref = parent.firstChild;
  for (const n of nodes) {
    if (n === ref) ref = ref.nextSibling;
    else parent.insertBefore(n, ref);
  }
  while (ref) {
    const next = ref.nextSibling;
    ref.remove();
    ref = next;
  }
}

const SVG = 'http://www.w3.org/2000/svg';

/** An inline SVG icon made of paths (no markup parsing, no external file). */
export function icon(viewBox, paths, cls) {
  const s = document.createElementNS(SVG, 'svg');
  s.setAttribute('viewBox', viewBox);
  s.setAttribute('aria-hidden', 'true');
  s.setAttribute('focusable', 'false');
  if (cls) s.setAttribute('class', cls);
  for (const d of paths) {
    const p = document.createElementNS(SVG, 'path');
    p.setAttribute('d', d);
    s.append(p);
  }
  return s;
}

const CHECK = 'M1.5 8.5l3.5 3.5 7.5-8.5';
const CHECK2 = 'M7 11l1 1 7.5-8.5';

/** The status icon of an own message: sending (clock), sent ✓, delivered ✓✓, read (blue ✓✓), failed (!). */
export function tickIcon(state) {
  switch (state) {
    case 'sending':
      return icon('0 0 16 16', ['M8 1.5a6.5 6.5 0 1 0 0 13a6.5 6.5 0 1 0 0-13z', 'M8 4.5V8.5l2.5 1.5'], 'clock');
    case 'sent':
      return icon('0 0 16 16', [CHECK], 'check');
    case 'delivered':
    case 'read':
      return icon('0 0 17 16', [CHECK, CHECK2], 'check');
    case 'failed':
      return icon('0 0 16 16', ['M8 2.5v7', 'M8 12v1.5'], 'bang');
    default:
      return null;
  }
}

export const TICK_LABEL = {
  sending: 'sending',
  sent: 'sent',
  delivered: 'delivered',
  read: 'read',
  failed: 'not sent',
};

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dateFmt = new Intl.DateTimeFormat(undefined, { year: 'numeric', month: 'short', day: 'numeric' });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: 'long' });

function startOfDay(t) {
  const d = new Date(t);
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

export function fmtTime(ts) {
  return timeFmt.format(new Date(ts));
}

/** "Today", "Yesterday", a weekday within the week, else a date. */
export function fmtDay(ts) {
  const days = Math.round((startOfDay(Date.now()) - startOfDay(ts)) / 86400000);
  if (days === 0) return 'Today';
  if (days === 1) return 'Yesterday';
  if (days > 1 && days < 7) return dayFmt.format(new Date(ts));
  return dateFmt.format(new Date(ts));
}

/** The time shown in the conversation list: a time today, else a day. */
export function fmtListTime(ts) {
  return startOfDay(ts) === startOfDay(Date.now()) ? fmtTime(ts) : fmtDay(ts);
}

export function fmtLastSeen(p) {
  if (!p) return '';
  if (p.online) return 'online';
  if (p.last_seen === null || p.last_seen === undefined) return 'offline';
  const day = fmtDay(p.last_seen);
  const when = day === 'Today' ? 'today' : day === 'Yesterday' ? 'yesterday' : day;
  return `last seen ${when} at ${fmtTime(p.last_seen)}`;
}

/** A stable colour for a name (avatars). */
export function hue(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return h % 360;
}

export function avatar(name, big) {
  const first = [...name.replace(/^g:/, '')][0] || '?';
  const a = el('span', { class: big ? 'avatar big' : 'avatar', 'aria-hidden': 'true' }, first.toUpperCase());
  a.style.setProperty('--hue', String(hue(name)));
  return a;
}
