// Infinite Chat's page: the join form, the chat view, and a protocol v1 client that reconnects by itself and
// resumes with `since` (docs/web-client.md, docs/protocol.md). User content only ever goes in through textContent.

// The server's rules (protocol.py), checked here first so a person gets a clear message before the server has to say.
const NAME_MAX = 32;
const TEXT_MAX = 2000;
const COUNTER_FROM = 1800;
const ROOM_PATTERN = /^[a-z0-9_-]{1,32}$/;
const NAME_CONTROL = /[\p{Cc}\u2028\u2029]/u;
const TEXT_CONTROL = /[^\P{Cc}\n\t]|[\u2028\u2029]/u;
// Python's str.strip() removes exactly these (str.isspace); JavaScript's trim() differs at the edges.
const EDGE_SPACE = /^[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+|[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$/gu;

const PAGE_SIZE = 50;
const API_TRIES = 3;
// Who is online: at most this many names are kept and shown (two pages of the API); the count is always exact.
const ONLINE_KEEP = 200;
const ONLINE_PAGE = 100;
// After a truncated presence event the whole room reads the list again: each page waits up to this long first, so
// that a room of thousands does not ask in the same instant.
const ONLINE_REFETCH_SPREAD_MS = 2000;
const NEAR_EDGE_PX = 48;
const BACKOFF_FIRST_MS = 500;
const BACKOFF_CAP_MS = 5000;
const WELCOME_TIMEOUT_MS = 15000;
const CLOSE_SERVICE_RESTART = 1012;
// A long queue (typed while offline) goes out in batches of the server's burst (RATE_BURST), each once the one before
// is answered: never a flood of frames, which the server would close with 1008, and no message of a later batch
// can overtake one of an earlier batch that the rate limit sends back.
const SEND_AHEAD = 10;
const NAME_KEY = "infinite-chat.name";
// Owned names: the claim token of each name this browser holds, as JSON {nameKey(name): token} (docs/web-client.md).
const TOKENS_KEY = "infinite-chat:tokens";
// A moderator's token (docs/protocol.md, "Moderation"): in sessionStorage, so it lasts this tab's reloads and
// reconnects but no longer, and no other tab or later visit gets it.
const MODERATOR_KEY = "infinite-chat:moderator";
const CLOSE_BANNED = 4003;
// What a moderator may set (docs/web-client.md, "Moderation"); the server takes any value in its ranges.
const REASON_MAX = 200;
// Conversation features (docs/protocol.md, "Edit, delete, react" and "typing").
const EDIT_WINDOW_MS = 900 * 1000; // EDIT_WINDOW_SECONDS
const REACTIONS = ["👍", "👎", "❤️", "😂", "😮", "😢", "🎉", "🙏", "👀", "🔥", "✅", "🚀"];
// Names kept per emoji of a message beyond the 10 a message object lists (live events add to them), at most.
const REACTION_NAMES_KEEP = 50;
const TYPING_EVERY_MS = 3000; // a `typing` frame at most this often while the person writes
const TYPING_STALE_MS = 6000; // no `typing` object for this long: nobody is typing (its replica may be gone)
const LONG_PRESS_MS = 500;
// A mention as the server finds one: "@" not after a letter, digit or "_", then up to the next space, without the
// punctuation that ends a sentence. Only the names the server lists in `mentions` are highlighted.
const MENTION = /(?<![\p{L}\p{N}_])@(\S+)/gu;
const MENTION_TRAILER = /[.,;:!?)\]}'"]+$/u;

const $ = (id) => document.getElementById(id);
const ui = {
  joinView: $("join-view"), joinForm: $("join-form"), name: $("name"), nameError: $("name-error"),
  room: $("room"), roomError: $("room-error"),
  chatView: $("chat-view"), roomTitle: $("room-title"), status: $("status"), statusText: $("status-text"),
  replica: $("replica"), leave: $("leave"), peopleToggle: $("people-toggle"), people: $("people"),
  joinNote: $("join-note"), release: $("release"), releaseConfirm: $("release-confirm"),
  releaseQuestion: $("release-question"), releaseYes: $("release-yes"), releaseKeep: $("release-keep"),
  releaseError: $("release-error"),
  onlineCount: $("online-count"), online: $("online"), onlineMore: $("online-more"),
  log: $("log"), older: $("older"), olderButton: $("older-button"), olderText: $("older-text"),
  messages: $("messages"), pending: $("pending"), pill: $("new-pill"),
  sendForm: $("send-form"), text: $("text"), counter: $("counter"), textError: $("text-error"),
  announce: $("announce"), typing: $("typing"), typingAnnounce: $("typing-announce"),
  editing: $("editing"), editCancel: $("edit-cancel"), send: $("send"),
  menu: $("menu"), menuReactions: $("menu-reactions"), menuNote: $("menu-note"), menuEdit: $("menu-edit"),
  menuDelete: $("menu-delete"), menuKeep: $("menu-keep"),
  menuReasonField: $("menu-reason-field"), menuReason: $("menu-reason"),
  moderatorDetails: $("moderator-details"), moderator: $("moderator"), moderatorError: $("moderator-error"),
  moderatorBadge: $("moderator-badge"), modBar: $("mod-bar"), slowMode: $("slow-mode"), slowError: $("slow-error"),
  mutedLine: $("muted-line"), slowLine: $("slow-line"),
  nameMenu: $("name-menu"), nameMenuTitle: $("name-menu-title"), nameMenuReason: $("name-menu-reason"),
  nameMenuNote: $("name-menu-note"), nameMenuError: $("name-menu-error"),
};

// A fresh id per page: refs are "<client>-<n>", unique among everyone's messages in practice.
const clientId = Array.from(crypto.getRandomValues(new Uint8Array(6)), (b) => b.toString(16).padStart(2, "0")).join("");
let refCounter = 0;

const chat = {
  name: null, // as typed until the first welcome, then as the server has it claimed (its first spelling)
  sentToken: null, // the token the last join carried, if any: stale when that join gets name_taken
  releasing: false, // a `release` of our name is on its way
  room: null,
  generation: 0, // bumped on every room change, so late answers for the old room are dropped
  ws: null,
  joined: false,
  welcomed: false, // this room's view has had its first welcome (history and the "you joined" marker)
  attempt: 0,
  reconnectTimer: 0,
  lastId: null, // newest id of anything from the log (message or change): `since` on reconnect
  oldestId: null, // oldest message id shown: `before` for scroll-back
  shown: new Map(), // message id -> what the page shows of it (see `recordOf`), in the DOM or about to be
  changes: new Map(), // ref -> an edit, delete or react of ours, until its change or error comes back
  orphans: null, // while a scroll-back page is on its way: changes to messages not shown yet, to apply to it
  editing: null, // {id, draft}: the message being edited in the composer, and what the composer held before
  typedAt: -Infinity, // when the last `typing` frame went
  typingTimer: 0, // a keystroke within 3 s of the last frame: the next one goes when they are up
  clockSkew: 0, // the server's clock minus ours, from our own echoes: the edit window is the server's
  more: false,
  loadingOlder: false,
  pending: new Map(), // ref -> {ref, text, state: "queued" | "sent" | "failed", tries, el, note}
  pauseUntil: 0,
  flushTimer: 0,
  oneAtATime: false, // after a rate limit: send the next message only when the last one is through
  outage: null, // {note, since} while the connection is lost after having been up
  unreadHidden: 0,
  mentionsHidden: 0,
  atBottom: true, // the reader is following the conversation at the bottom
  moderator: false, // the welcome said this connection is a moderator's
  sentModerator: null, // the moderator token the last join carried: dropped when that join gets invalid_token
  mutedUntil: 0, // when a moderator's mute of our name ends (our clock), 0 when not muted
  muteTimer: 0,
  slowSeconds: 0, // the room's slow mode, 0 when off
  modActions: new Map(), // ref -> {frame, tool: "name" | "slow"}: a moderator's mute, ban or slow on its way
  banned: null, // {scope, until}: the last ban of our name the room announced, for the 4003 close after it
};

// Who is typing, as the last `typing` object said (less the names whose message came since).
const typing = {
  names: [], // most recent first, possibly our own name
  count: 0,
  staleTimer: 0,
  announced: new Set(), // names told to screen readers in their current burst of typing
};

// Who is online, kept as docs/protocol.md says ("Keeping the list"): the welcome's names, then each presence
// event's `joined` and `left`; read again from the API after a `truncated` event.
const presence = {
  names: [], // sorted by code point: all names online when `complete`, else the first ones
  count: 0,
  complete: true,
  generation: 0, // bumped by every welcome: a read of the list begun before it is dropped
  refetch: null, // while the list is read again: {events: [presence events since], again: another truncated one came}
  stale: false, // the last read failed: read again on the next event
};

// ---------------------------------------------------------------------------------------------------------------
// Rules

function strip(value) {
  return value.replace(EDGE_SPACE, "");
}

function length(value) {
  // Characters as the server counts them (code points), not UTF-16 units.
  let n = 0;
  for (const _ of value) n += 1;
  return n;
}

function nameProblem(raw) {
  const name = strip(raw);
  if (!name) return "Pick a name.";
  if (length(name) > NAME_MAX) return `A name has at most ${NAME_MAX} characters.`;
  if (NAME_CONTROL.test(name)) return "A name cannot contain control characters such as line breaks.";
  return null;
}

function roomProblem(room) {
  if (!room) return "Pick a room, for example lobby.";
  if (room.length > 32) return "A room name has at most 32 characters.";
  if (!ROOM_PATTERN.test(room)) return "A room name uses only a-z, 0-9, - and _ (no spaces).";
  return null;
}

function textProblem(text) {
  const n = length(text);
  if (n > TEXT_MAX) return `Too long: a message has at most ${TEXT_MAX} characters (this one has ${n}).`;
  if (TEXT_CONTROL.test(text)) return "This message contains control characters; remove them and try again.";
  return null;
}

function normalRoom(raw) {
  return strip(raw).toLowerCase();
}

function compareIds(a, b) {
  const [am, as] = a.split("-");
  const [bm, bs] = b.split("-");
  const ms = BigInt(am) - BigInt(bm);
  if (ms !== 0n) return ms < 0n ? -1 : 1;
  const seq = BigInt(as) - BigInt(bs);
  return seq === 0n ? 0 : seq < 0n ? -1 : 1;
}

// ---------------------------------------------------------------------------------------------------------------
// Owned names: the claim tokens this browser holds. Kept in localStorage, so that a reload, another tab or the next
// visit joins as the same person; kept in the page too, so that reconnects work where storage is refused.

const pageTokens = {};

function nameKey(name) {
  return name.normalize("NFKC").toLowerCase();
}

function storedTokens() {
  try {
    const tokens = JSON.parse(localStorage.getItem(TOKENS_KEY) || "{}");
    return tokens && typeof tokens === "object" && !Array.isArray(tokens) ? tokens : {};
  } catch {
    return {}; // refused (private modes) or not JSON: nothing kept
  }
}

function saveTokens(tokens) {
  try {
    if (Object.keys(tokens).length) localStorage.setItem(TOKENS_KEY, JSON.stringify(tokens));
    else localStorage.removeItem(TOKENS_KEY);
  } catch {
    // Private modes may refuse storage: the page's own copy still serves its reconnects.
  }
}

function tokenFor(name) {
  const key = nameKey(name);
  // Storage first: another tab may have learnt something newer (or released the name).
  const token = storedTokens()[key] ?? pageTokens[key];
  return typeof token === "string" && token ? token : null;
}

function keepToken(names, token) {
  const tokens = storedTokens();
  for (const name of names) {
    tokens[nameKey(name)] = token;
    pageTokens[nameKey(name)] = token;
  }
  saveTokens(tokens);
}

function dropToken(token) {
  // Every key the token is kept under (the typed spelling and the claimed one) goes with it.
  const tokens = storedTokens();
  for (const store of [tokens, pageTokens]) {
    for (const [key, value] of Object.entries(store)) if (value === token) delete store[key];
  }
  saveTokens(tokens);
}

function forgetName() {
  try {
    localStorage.removeItem(NAME_KEY);
  } catch {
    // Nothing was kept.
  }
}

// The moderator token of this tab: sessionStorage first (a reload), the page's copy where storage is refused.
let pageModerator = null;

function moderatorToken() {
  let token = null;
  try {
    token = sessionStorage.getItem(MODERATOR_KEY);
  } catch {
    token = null;
  }
  token = token ?? pageModerator;
  return typeof token === "string" && token ? token : null;
}

function keepModerator(token) {
  pageModerator = token || null;
  try {
    if (token) sessionStorage.setItem(MODERATOR_KEY, token);
    else sessionStorage.removeItem(MODERATOR_KEY);
  } catch {
    // Private modes may refuse storage: the page's own copy serves this page's reconnects.
  }
}

function waitText(ms) {
  const seconds = Math.max(1, Math.ceil(Number(ms || 0) / 1000));
  return seconds < 60 ? `${seconds} s` : `${Math.ceil(seconds / 60)} min`;
}

// ---------------------------------------------------------------------------------------------------------------
// Rendering (textContent only)

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayTimeFormat = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });

function timeElement(date) {
  const time = el("time", "time");
  if (Number.isNaN(date.getTime())) return time;
  const today = new Date().toDateString() === date.toDateString();
  time.textContent = (today ? timeFormat : dayTimeFormat).format(date);
  time.dateTime = date.toISOString();
  time.title = fullFormat.format(date);
  return time;
}

function hue(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function bubble(name, text, date, own) {
  const li = el("li", own ? "msg own" : "msg");
  const meta = el("div", "meta");
  const who = el("span", "who", name);
  // CSSOM, not a style attribute: allowed by the page's CSP.
  who.style.setProperty("--hue", String(hue(name)));
  if (own) who.append(el("span", "sr-only", " (you)"));
  meta.append(who, " ", timeElement(date));
  li.append(meta, el("div", "text", text));
  return li;
}

// What the page shows of a message, as the server says it now is (edited, deleted, its reactions), then kept up to
// date by the changes that follow it in the log.
function recordOf(message) {
  const deleted = typeof message.deleted === "string" ? message.deleted : null;
  return {
    id: message.id,
    name: String(message.name),
    ts: String(message.ts),
    text: deleted || typeof message.text !== "string" ? "" : message.text,
    mentions: deleted ? [] : strings(message.mentions),
    edited: typeof message.edited === "string" ? message.edited : null,
    deleted,
    moderated: Boolean(deleted) && message.moderated === true, // removed by a moderator
    reason: null, // a moderator's reason, when the page saw the deletion live
    reactions: deleted ? new Map() : reactionsOf(message.reactions),
    editClosed: false, // the server said edit_window_closed
    busy: new Set(), // emoji whose reaction of ours is on its way
    note: null, // {text, kind, action?: {label, run}}: how our last change to it went
    el: el("li"),
  };
}

function reactionsOf(list) {
  const reactions = new Map();
  if (!Array.isArray(list)) return reactions;
  for (const item of list) {
    if (!item || typeof item.emoji !== "string" || !Number.isInteger(item.count) || item.count <= 0) continue;
    const names = strings(item.names).slice(0, REACTION_NAMES_KEEP);
    // The object lists the first 10 names: past them, whether one of them is ours is known only from our own
    // reaction events (or a `no_change` answer).
    reactions.set(item.emoji, { count: item.count, names, mine: names.includes(chat.name) });
  }
  return reactions;
}

function messageElement(message) {
  const record = recordOf(message);
  chat.shown.set(record.id, record);
  record.el.dataset.id = record.id;
  render(record);
  return record.el;
}

function isOwn(record) {
  return record.name === chat.name;
}

function serverNow() {
  return Date.now() + chat.clockSkew;
}

function canEdit(record) {
  if (!isOwn(record) || record.deleted || record.editClosed) return false;
  const sent = Date.parse(record.ts);
  return Number.isNaN(sent) || serverNow() < sent + EDIT_WINDOW_MS;
}

// The text as text nodes, with the mentions the server listed (ours stronger) in spans: still textContent only.
function textWithMentions(text, mentions) {
  const node = el("div", "text");
  if (!mentions.length) {
    node.textContent = text;
    return node;
  }
  const listed = new Set(mentions);
  let at = 0;
  for (const match of text.matchAll(MENTION)) {
    const name = match[1].replace(MENTION_TRAILER, "");
    if (!listed.has(name)) continue;
    if (match.index > at) node.append(text.slice(at, match.index));
    node.append(el("span", name === chat.name ? "mention me" : "mention", `@${name}`));
    at = match.index + 1 + name.length;
  }
  if (at < text.length) node.append(text.slice(at));
  return node;
}

function namesText(names, count) {
  const shown = names.map((name) => (name === chat.name ? "you" : name));
  const others = count - shown.length;
  if (others > 0) shown.push(others === 1 ? "1 other" : `${others} others`);
  if (shown.length <= 1) return shown.join("");
  return `${shown.slice(0, -1).join(", ")} and ${shown[shown.length - 1]}`;
}

function reactionChip(record, emoji, reaction) {
  const chip = el("button", "reaction");
  chip.type = "button";
  chip.dataset.emoji = emoji;
  chip.dataset.focus = `reaction-${emoji}`;
  chip.setAttribute("aria-pressed", String(reaction.mine));
  const who = namesText(reaction.mine && !reaction.names.includes(chat.name) ? [chat.name, ...reaction.names] : reaction.names, reaction.count);
  chip.title = who;
  chip.setAttribute("aria-label", `${emoji} ${reaction.count}: ${who}. ${reaction.mine ? "Remove your reaction" : "Add yours"}`);
  if (record.busy.has(emoji)) chip.setAttribute("aria-busy", "true");
  chip.append(el("span", "emoji", emoji), el("span", "n", String(reaction.count)));
  return chip;
}

// Draws a message from its record, in its own <li> (kept, so that its place in the list and in the tab order
// stay); focus inside it stays on the same control.
function render(record) {
  const li = record.el;
  const own = isOwn(record);
  const focused = li.contains(document.activeElement) ? document.activeElement.dataset.focus : undefined;
  const date = new Date(record.ts);
  li.replaceChildren();
  if (record.deleted) {
    li.className = own ? "msg own deleted" : "msg deleted";
    const gone = el("p", "gone", record.moderated ? "message removed by a moderator" : "message deleted");
    const by = record.moderated ? " by a moderator" : "";
    const reason = record.reason ? ` (${record.reason})` : "";
    gone.title = `${own ? "Your" : `${record.name}'s`} message of ${fullFormat.format(date)}, deleted${by} ${fullFormat.format(new Date(record.deleted))}${reason}`;
    li.append(gone);
    if (record.note) li.append(noteElement(record));
    return;
  }
  const mentioned = !own && record.mentions.includes(chat.name);
  li.className = `msg${own ? " own" : ""}${mentioned ? " mentions-me" : ""}${chat.editing?.id === record.id ? " being-edited" : ""}`;
  const meta = el("div", "meta");
  const who = nameElement(record.name, own, "who");
  // CSSOM, not a style attribute: allowed by the page's CSP.
  who.style.setProperty("--hue", String(hue(record.name)));
  if (own) who.append(el("span", "sr-only", " (you)"));
  meta.append(who, " ", timeElement(date));
  if (record.edited) {
    const edited = el("time", "edited", "(edited)");
    const at = new Date(record.edited);
    if (!Number.isNaN(at.getTime())) {
      edited.dateTime = at.toISOString();
      edited.title = `Edited ${fullFormat.format(at)}`;
    }
    meta.append(" ", edited);
  }
  if (mentioned) meta.append(el("span", "sr-only", " (mentions you)"));
  const more = el("button", "more", "⋯");
  more.type = "button";
  more.dataset.focus = "more";
  more.setAttribute("aria-label", `Actions for ${own ? "your" : `${record.name}'s`} message`);
  more.setAttribute("aria-haspopup", "dialog");
  more.setAttribute("aria-expanded", String(menu.record === record));
  li.append(meta, textWithMentions(record.text, record.mentions));
  if (record.reactions.size) {
    const row = el("div", "reactions");
    row.setAttribute("role", "group");
    row.setAttribute("aria-label", "Reactions");
    for (const [emoji, reaction] of record.reactions) row.append(reactionChip(record, emoji, reaction));
    li.append(row);
  }
  if (record.note) li.append(noteElement(record));
  li.append(more);
  if (focused) li.querySelector(`[data-focus="${CSS.escape(focused)}"]`)?.focus();
}

// A person's name: for a moderator, someone else's name is a button that opens the name menu (mute, ban).
function nameElement(name, own, className) {
  if (!chat.moderator || own) return el("span", className, name);
  const button = el("button", `${className} name-button`, name);
  button.type = "button";
  button.dataset.name = name;
  button.dataset.focus = "name";
  button.setAttribute("aria-haspopup", "dialog");
  button.setAttribute("aria-label", `${name}: moderator actions`);
  return button;
}

function noteElement(record) {
  const { text, kind, action } = record.note;
  const note = el("p", `change-note${kind ? ` ${kind}` : ""}`, text);
  note.setAttribute("role", "status");
  if (action) {
    const button = el("button", "quiet", action.label);
    button.type = "button";
    button.dataset.focus = "note-action";
    button.addEventListener("click", action.run);
    note.append(" ", button);
  }
  if (kind === "failed") {
    const dismiss = el("button", "quiet", "Dismiss");
    dismiss.type = "button";
    dismiss.addEventListener("click", () => {
      setRecordNote(record, null);
      record.el.querySelector(".more")?.focus();
    });
    note.append(" ", dismiss);
  }
  return note;
}

function setRecordNote(record, note) {
  record.note = note;
  rerender(record);
}

// Redraws a shown message; the reader at the bottom stays there when it grows (a first reaction).
function rerender(record) {
  const follow = record.el.isConnected && nearBottom();
  render(record);
  if (follow) ui.log.scrollTop = ui.log.scrollHeight;
}

function systemElement(text, className = "system") {
  const li = el("li", className);
  li.setAttribute("role", "separator");
  li.append(el("span", "", text));
  return li;
}

function nearBottom() {
  const log = ui.log;
  return log.scrollHeight - log.scrollTop - log.clientHeight < NEAR_EDGE_PX;
}

function scrollToBottom() {
  ui.log.scrollTop = ui.log.scrollHeight;
  chat.atBottom = true;
  hidePill();
}

function hidePill() {
  ui.pill.hidden = true;
  ui.pill.dataset.count = "0";
}

function showPill(added) {
  const count = Number(ui.pill.dataset.count || "0") + added;
  ui.pill.dataset.count = String(count);
  ui.pill.textContent = count === 1 ? "1 new message ↓" : `${count} new messages ↓`;
  ui.pill.hidden = false;
}

// Entries of the log in its order (a welcome's history, a live object): new messages go into a fragment, changes are
// applied to the messages they change (those in the fragment too).
function takeEntries(entries) {
  const fragment = document.createDocumentFragment();
  let added = 0;
  for (const entry of entries) {
    if (!entry || typeof entry !== "object") continue;
    if (entry.type === "message") {
      if (!remember(entry)) continue;
      fragment.append(messageElement(entry));
      added += 1;
    } else if (CHANGE_TYPES.has(entry.type)) {
      onChange(entry);
    }
  }
  return { fragment, added };
}

// Adds messages at the bottom; follows them only if the reader was already at the bottom (or sent one).
function appendLive(entries, { own = false } = {}) {
  const follow = nearBottom() || own;
  const { fragment, added } = takeEntries(entries);
  if (!added) return 0;
  ui.messages.append(fragment);
  if (ui.older.dataset.state === "start") setOlder("start"); // "No messages yet" is no longer true
  if (follow) scrollToBottom();
  else showPill(added);
  return added;
}

function appendNote(node) {
  const follow = nearBottom();
  ui.messages.append(node);
  if (follow) scrollToBottom();
}

// Dedupe by id; tracks the newest (for `since`) and the oldest (for scroll-back) ids.
function remember(message) {
  if (typeof message.id !== "string" || chat.shown.has(message.id)) return false;
  noteLogId(message.id);
  if (chat.oldestId === null || compareIds(message.id, chat.oldestId) < 0) chat.oldestId = message.id;
  return true;
}

// Changes are entries of the log too: resuming after the newest of anything is what the server asks.
function noteLogId(id) {
  if (typeof id === "string" && (chat.lastId === null || compareIds(id, chat.lastId) > 0)) chat.lastId = id;
}

function announce(message, mentioned = false) {
  ui.announce.textContent = `${message.name}${mentioned ? " mentioned you" : ""}: ${message.text}`;
}

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.statusText.textContent = text;
}

function setReplica(replica) {
  ui.replica.hidden = false;
  ui.replica.dataset.replica = replica;
  ui.replica.textContent = replica;
  ui.replica.title = `Connected through replica ${replica}`;
  ui.replica.setAttribute("aria-label", `Server replica ${replica}`);
}

// Names compare by code point, as the server sorts them (JavaScript's < compares UTF-16 units, which differs past U+FFFF).
function compareNames(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i += 1) {
    const x = a.codePointAt(i);
    const y = b.codePointAt(i);
    if (x !== y) return x < y ? -1 : 1;
    if (x > 0xffff) i += 1;
  }
  return a.length - b.length;
}

function nameIndex(name) {
  let low = 0;
  let high = presence.names.length;
  while (low < high) {
    const middle = (low + high) >> 1;
    if (compareNames(presence.names[middle], name) < 0) low = middle + 1;
    else high = middle;
  }
  return low;
}

function strings(value) {
  return Array.isArray(value) ? value.filter((item) => typeof item === "string") : [];
}

function setOnline(names, count, complete) {
  presence.names = [...new Set(names)].sort(compareNames);
  presence.count = Number.isInteger(count) ? count : presence.names.length;
  presence.complete = complete;
  keepAtMost();
}

function keepAtMost() {
  if (presence.names.length > ONLINE_KEEP) {
    presence.names.length = ONLINE_KEEP;
    presence.complete = false;
  }
}

// One event's change. A list of the first names only takes the names that sort among them.
function applyPresence(event) {
  for (const name of strings(event.left)) {
    const at = nameIndex(name);
    if (presence.names[at] === name) presence.names.splice(at, 1);
  }
  for (const name of strings(event.joined)) {
    const at = nameIndex(name);
    if (presence.names[at] === name) continue;
    if (presence.complete || at < presence.names.length) presence.names.splice(at, 0, name);
  }
  keepAtMost();
}

function onPresence(event) {
  if (Number.isInteger(event.online_count)) presence.count = event.online_count;
  applyPresence(event);
  if (presence.refetch) {
    presence.refetch.events.push(event);
    if (event.truncated === true) presence.refetch.again = true;
  } else if (event.truncated === true || presence.stale || (!presence.complete && !presence.names.length && presence.count)) {
    refetchOnline();
  } else if (!presence.complete && presence.names.length === presence.count) {
    presence.complete = true; // the first names are all of them now
  }
  showOnline();
}

// Reads the list again (paged, at most ONLINE_KEEP names), then applies the events that came meanwhile.
function refetchOnline() {
  const generation = presence.generation;
  const room = chat.room;
  const refetch = { events: [], again: false };
  presence.refetch = refetch;
  setTimeout(async () => {
    let read = null;
    try {
      read = await fetchOnline(room);
    } catch (error) {
      console.warn("infinite-chat: who is online", error);
    }
    if (generation !== presence.generation) return;
    presence.refetch = null;
    presence.stale = read === null;
    if (read) {
      setOnline(read.names, read.count, read.complete);
      for (const event of refetch.events) applyPresence(event);
      showOnline();
    }
    if (refetch.again) refetchOnline();
  }, Math.random() * ONLINE_REFETCH_SPREAD_MS);
}

async function fetchOnline(room) {
  const names = [];
  let after = null;
  let count = 0;
  for (let page = 0; page < ONLINE_KEEP / ONLINE_PAGE; page += 1) {
    const query = new URLSearchParams({ limit: String(ONLINE_PAGE) });
    if (after !== null) query.set("after", after);
    const answer = await fetchJson(`/api/rooms/${encodeURIComponent(room)}/online?${query}`);
    names.push(...strings(answer.online));
    count = Number.isInteger(answer.online_count) ? answer.online_count : names.length;
    after = typeof answer.next === "string" ? answer.next : null;
    if (after === null) return { names, count, complete: true };
  }
  return { names, count, complete: false };
}

function resetOnline(names = [], count = 0) {
  presence.generation += 1;
  presence.refetch = null;
  presence.stale = false;
  const list = strings(names);
  setOnline(list, count, !(Number.isInteger(count) && count > list.length));
  showOnline();
}

function showOnline() {
  const total = presence.count;
  const items = presence.names.map((name) => {
    const li = el("li", name === chat.name ? "me" : "");
    li.append(nameElement(name, name === chat.name, "online-name"));
    if (name === chat.name) li.append(el("span", "you", " (you)"));
    return li;
  });
  ui.online.replaceChildren(...items);
  ui.onlineCount.textContent = String(total);
  const more = Math.max(0, total - presence.names.length);
  ui.onlineMore.hidden = more === 0;
  ui.onlineMore.textContent = `+${more} more`;
  ui.peopleToggle.textContent = `${total} online`;
}

function setOlder(state) {
  ui.older.dataset.state = state;
  ui.olderButton.hidden = state !== "idle" && state !== "failed";
  ui.olderButton.textContent = state === "failed" ? "Try loading older messages again" : "Load older messages";
  const texts = {
    idle: "",
    loading: "Loading older messages…",
    failed: "Older messages could not be loaded.",
    start: chat.shown.size ? `This is the beginning of #${chat.room}.` : `No messages in #${chat.room} yet. Say hello!`,
  };
  ui.olderText.textContent = texts[state];
}

// ---------------------------------------------------------------------------------------------------------------
// Views

function showJoin(message) {
  ui.joinView.hidden = false;
  ui.chatView.hidden = true;
  ui.roomTitle.hidden = true;
  ui.leave.hidden = true;
  hideRelease();
  ui.release.hidden = true;
  ui.joinNote.textContent = "";
  ui.peopleToggle.hidden = true;
  ui.replica.hidden = true;
  setStatus("offline", "Not connected");
  if (chat.name) ui.name.value = chat.name;
  if (chat.room) ui.room.value = chat.room;
  const token = moderatorToken();
  ui.moderator.value = token || "";
  if (token) ui.moderatorDetails.open = true;
  if (message) showFieldError(message.field, message.text);
  (message?.field === "room" ? ui.room : ui.name).focus();
  document.title = "Infinite Chat";
}

function showFieldError(field, text) {
  const input = { room: ui.room, moderator: ui.moderator }[field] || ui.name;
  const error = { room: ui.roomError, moderator: ui.moderatorError }[field] || ui.nameError;
  error.textContent = text || "";
  if (text) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

function resetConversation() {
  closeMenu({ refocus: false });
  stopEditing();
  ui.messages.replaceChildren();
  chat.changes.clear();
  chat.orphans = null;
  chat.shown.clear();
  chat.lastId = null;
  chat.oldestId = null;
  chat.more = false;
  chat.loadingOlder = false;
  chat.welcomed = false;
  chat.outage = null;
  setOlder("idle");
  hidePill();
}

function enterRoom(name, room) {
  leaveSocket();
  chat.generation += 1;
  chat.name = name;
  chat.room = room;
  chat.attempt = 0;
  for (const item of chat.pending.values()) item.el.remove();
  chat.pending.clear();
  resetConversation();
  rememberName(name);
  if (location.hash !== `#${room}`) history.replaceState(null, "", `#${room}`);
  chat.unreadHidden = 0;
  chat.mentionsHidden = 0;
  chat.typedAt = -Infinity;
  typingEnded();
  clearTyping();
  resetRules();
  document.title = `#${room} · Infinite Chat`;
  ui.roomTitle.textContent = `#${room}`;
  ui.roomTitle.hidden = false;
  ui.joinView.hidden = true;
  ui.chatView.hidden = false;
  ui.leave.hidden = false;
  hideRelease();
  ui.release.hidden = !tokenFor(name);
  ui.peopleToggle.hidden = false;
  resetOnline();
  ui.text.focus();
  connect();
}

function rememberName(name) {
  try {
    localStorage.setItem(NAME_KEY, name);
  } catch {
    // Private modes may refuse storage; the name is then asked again next time.
  }
}

// A join refused: the name is someone else's. Back to the form (no reconnect: it would be refused again), and a
// token that was sent for it is stale (the claim expired and someone else took the name).
function nameTaken() {
  const name = chat.name;
  if (chat.sentToken) dropToken(chat.sentToken);
  forgetName();
  leaveRoom();
  showFieldError("name", `“${name}” is someone else's name here. Pick another one.`);
  ui.name.focus();
}

// Releasing one's name: asked once more in a bar above the conversation (no dialog), then `release` on the joined
// socket; `released` ends the claim, and the server closes the socket (1000), which is not reconnected.
function askRelease() {
  ui.releaseQuestion.textContent = `Release “${chat.name}”? Anyone may then take it, and you leave the room.`;
  ui.releaseError.textContent = "";
  ui.releaseYes.disabled = false;
  ui.releaseYes.textContent = "Yes, release it";
  ui.releaseConfirm.hidden = false;
  ui.release.setAttribute("aria-expanded", "true");
  ui.releaseYes.focus();
}

function hideRelease() {
  chat.releasing = false;
  ui.releaseConfirm.hidden = true;
  ui.release.setAttribute("aria-expanded", "false");
}

function sendRelease() {
  const token = tokenFor(chat.name);
  const ws = chat.ws;
  if (!token) {
    releaseFailed("This page does not hold the name's token, so it cannot release it.");
    return;
  }
  if (!ws || !chat.joined || ws.readyState !== WebSocket.OPEN) {
    releaseFailed("Not connected: try again once the page says Connected.");
    return;
  }
  chat.releasing = true;
  chat.sentToken = token;
  ui.releaseError.textContent = "";
  ui.releaseYes.disabled = true;
  ui.releaseYes.textContent = "Releasing…";
  ws.send(JSON.stringify({ type: "release", name: chat.name, token }));
}

function releaseFailed(text) {
  chat.releasing = false;
  ui.releaseYes.disabled = false;
  ui.releaseYes.textContent = "Yes, release it";
  ui.releaseError.textContent = text;
}

function onReleased(released) {
  if (!chat.releasing) return;
  const name = typeof released.name === "string" && released.name ? released.name : chat.name;
  if (chat.sentToken) dropToken(chat.sentToken);
  forgetName();
  // Leaving first, so the server's close after `released` is one we asked for: nothing reconnects.
  leaveRoom();
  chat.name = null;
  ui.name.value = "";
  ui.joinNote.textContent = `“${name}” is released: it is free now, for anyone. Pick a name to join again.`;
}

function leaveRoom() {
  leaveSocket();
  typingEnded();
  clearTyping();
  chat.generation += 1;
  for (const item of chat.pending.values()) item.el.remove();
  chat.pending.clear();
  resetConversation();
  resetRules();
  showJoin();
}

// ---------------------------------------------------------------------------------------------------------------
// Connection

function socketUrl() {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
}

function connect() {
  clearTimeout(chat.reconnectTimer);
  chat.reconnectTimer = 0;
  setStatus(chat.attempt ? "reconnecting" : "connecting", chat.attempt ? "Reconnecting…" : "Connecting…");
  let ws;
  try {
    ws = new WebSocket(socketUrl());
  } catch {
    scheduleReconnect(0);
    return;
  }
  chat.ws = ws;
  // A socket that opens but never gets its welcome (a stuck hop) is given up and retried.
  const welcomeTimer = setTimeout(() => ws.close(4000, "no welcome"), WELCOME_TIMEOUT_MS);
  ws.addEventListener("open", () => {
    const join = { type: "join", name: chat.name, room: chat.room };
    if (chat.lastId) join.since = chat.lastId;
    chat.sentToken = tokenFor(chat.name);
    if (chat.sentToken) join.token = chat.sentToken;
    chat.sentModerator = moderatorToken();
    if (chat.sentModerator) join.moderator = chat.sentModerator;
    ws.send(JSON.stringify(join));
  });
  ws.addEventListener("message", (event) => {
    if (ws !== chat.ws) return;
    // A server frame holds one or more objects, one per line.
    for (const line of String(event.data).split("\n")) {
      if (!line) continue;
      let obj;
      try {
        obj = JSON.parse(line);
      } catch {
        console.warn("infinite-chat: a line that is not JSON", line);
        continue;
      }
      if (obj && obj.type === "welcome") clearTimeout(welcomeTimer);
      dispatch(obj);
    }
  });
  ws.addEventListener("close", (event) => {
    clearTimeout(welcomeTimer);
    if (ws !== chat.ws) return; // closed on purpose (room change, leave, our name released)
    chat.ws = null;
    chat.joined = false;
    if (event.code === CLOSE_BANNED) {
      // A moderator's ban: joining again would be refused, so the page does not reconnect.
      bannedOut(chat.banned?.scope || "room", chat.banned?.until ?? null);
      return;
    }
    failModActions("Not done: the connection dropped. Try again once connected.");
    if (chat.releasing) releaseFailed("Not released: the connection dropped. Try again once connected.");
    requeueSent("Waiting for the connection…");
    // Changes on their way get no answer on this socket: they go again after the next welcome.
    for (const change of chat.changes.values()) change.state = "queued";
    clearTyping();
    if (chat.welcomed && !chat.outage) {
      chat.outage = { since: Date.now(), note: systemElement("Connection lost. Reconnecting…", "system warn") };
      appendNote(chat.outage.note);
    }
    scheduleReconnect(event.code);
  });
}

function leaveSocket() {
  clearTimeout(chat.reconnectTimer);
  chat.reconnectTimer = 0;
  clearTimeout(chat.flushTimer);
  chat.flushTimer = 0;
  const ws = chat.ws;
  chat.ws = null;
  chat.joined = false;
  if (ws) ws.close(1000, "leaving");
}

function scheduleReconnect(code) {
  // A replica restarting (1012) has a healthy sibling: go at once, with a little jitter so a crowd spreads out.
  // Otherwise exponential backoff with jitter, capped, so a dead network is retried steadily but not hammered.
  let delay;
  if (code === CLOSE_SERVICE_RESTART && chat.attempt === 0) {
    delay = 100 + Math.random() * 400;
  } else {
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_FIRST_MS * 2 ** chat.attempt);
    delay = ceiling / 2 + Math.random() * (ceiling / 2);
  }
  chat.attempt += 1;
  const seconds = Math.ceil(delay / 1000);
  setStatus("reconnecting", delay < 1500 ? "Reconnecting…" : `Reconnecting in ${seconds} s…`);
  chat.reconnectTimer = setTimeout(connect, delay);
}

function reconnectNow() {
  if (chat.reconnectTimer && chat.room) {
    chat.attempt = Math.max(chat.attempt, 1);
    connect();
  }
}

function dispatch(obj) {
  switch (obj?.type) {
    case "welcome":
      onWelcome(obj);
      break;
    case "message":
      onMessage(obj);
      break;
    case "presence":
      onPresence(obj);
      break;
    case "edit":
    case "delete":
    case "reaction":
      onChange(obj);
      break;
    case "typing":
      onTyping(obj);
      break;
    case "error":
      onError(obj);
      break;
    case "released":
      onReleased(obj);
      break;
    case "moderation":
      onModeration(obj);
      break;
    default:
      console.warn("infinite-chat: unknown object from the server", obj);
  }
}

function onWelcome(welcome) {
  chat.joined = true;
  chat.attempt = 0;
  // The name as claimed (its first spelling), whichever spelling was typed: it is what the room sees, so own
  // messages, reactions and mentions are known by it.
  const typed = chat.name;
  if (typeof welcome.name === "string" && welcome.name) chat.name = welcome.name;
  if (typeof welcome.token === "string" && welcome.token) keepToken([typed, chat.name], welcome.token);
  rememberName(chat.name);
  ui.release.hidden = !tokenFor(chat.name);
  setModerator(welcome.moderator === true);
  // The welcome says how the room's rules stand for us now: what was known before the reconnect is replaced.
  const until = typeof welcome.muted_until === "string" ? Date.parse(welcome.muted_until) : NaN;
  setMuted(Number.isNaN(until) ? 0 : until - chat.clockSkew);
  setSlow(Number.isInteger(welcome.slow_seconds) ? welcome.slow_seconds : 0);
  setStatus("online", "Connected");
  setReplica(String(welcome.replica));
  resetOnline(welcome.online, welcome.online_count);
  const history = Array.isArray(welcome.history) ? welcome.history : [];
  clearTyping(); // the server sends who is typing within 2 s
  // Messages (and changes) that reached the server before the socket dropped are in the resumed history: not sent
  // twice. Changes that are not there are sent again: one stored after all gets `no_change`, which is success.
  for (const entry of history) {
    if (entry?.type === "message" && entry.ref && chat.pending.has(entry.ref)) dropPending(entry.ref);
  }
  if (chat.welcomed && !welcome.resumed) {
    // `since` was no longer in the room's log: what was shown has a gap after it, so start the view afresh.
    const editing = chat.editing;
    resetConversation();
    if (editing) ui.textError.textContent = "The conversation was reloaded; edit your message again if you still want to.";
  }
  if (!chat.welcomed) {
    chat.welcomed = true;
    const { fragment } = takeEntries(history);
    ui.messages.append(fragment);
    if (chat.shown.size) ui.messages.append(systemElement(`You joined · ${timeFormat.format(new Date())}`, "divider"));
    chat.more = chat.shown.size > 0;
    setOlder(chat.more ? "idle" : "start");
    scrollToBottom();
    maybeLoadOlder();
  } else {
    appendLive(history);
  }
  if (chat.outage) {
    const away = Math.max(1, Math.round((Date.now() - chat.outage.since) / 1000));
    chat.outage.note.firstChild.textContent = `Connection lost for ${away} s; reconnected.`;
    chat.outage.note.className = "system";
    chat.outage = null;
  }
  flush();
}

function onMessage(message) {
  if (message.room !== chat.room) return;
  const own = Boolean(message.ref && chat.pending.has(message.ref));
  if (own) {
    dropPending(message.ref);
    // Our echo's time is the server's clock (Redis's): the edit window is measured on it.
    const ts = Date.parse(message.ts);
    if (!Number.isNaN(ts)) chat.clockSkew = ts - Date.now();
    flush();
  }
  stoppedTyping(String(message.name));
  if (appendLive([message], { own }) && !own) {
    const mentioned = message.name !== chat.name && strings(message.mentions).includes(chat.name);
    announce(message, mentioned);
    if (document.hidden) {
      chat.unreadHidden += 1;
      if (mentioned) chat.mentionsHidden += 1;
      updateTitle();
    }
  }
}

function onError(error) {
  // Any frame refused for a mute says how long it lasts.
  if (error.code === "muted" && Number(error.retry_after_ms) > 0) setMuted(Date.now() + Number(error.retry_after_ms));
  const item = error.ref ? chat.pending.get(error.ref) : undefined;
  if (item) {
    pendingError(item, error);
    return;
  }
  const action = error.ref ? chat.modActions.get(error.ref) : undefined;
  if (action) {
    modActionError(action, error);
    return;
  }
  const change = error.ref ? chat.changes.get(error.ref) : undefined;
  if (change) {
    changeError(change, error);
    return;
  }
  if (chat.releasing && (error.code === "rate_limited" || error.code === "unavailable")) {
    // The release was not done (too many tries of a name, or storage away); the socket stays as it was.
    releaseFailed(`Not released: ${error.detail || "try again in a moment."}`);
    return;
  }
  switch (error.code) {
    case "name_taken":
      if (chat.releasing) {
        // Our token is not the name's (released or lost elsewhere): the page no longer holds it.
        const name = chat.name;
        if (chat.sentToken) dropToken(chat.sentToken);
        forgetName();
        leaveRoom();
        showFieldError("name", `“${name}” is no longer yours here: it was released elsewhere. Pick a name.`);
        break;
      }
      nameTaken();
      break;
    case "too_many_names": {
      forgetName();
      leaveRoom();
      showFieldError(
        "name",
        `Too many new names were taken from your address this hour: try again in about ${waitText(error.retry_after_ms)}, or join under a name you have used here before.`,
      );
      break;
    }
    case "invalid_token":
      if (chat.sentModerator) {
        // The moderator token is not one of this chat's: it is dropped, and the form says so on its field.
        keepModerator(null);
        chat.sentModerator = null;
        leaveRoom();
        ui.moderatorDetails.open = true;
        showFieldError("moderator", "That is not a moderator token of this chat. Check it, or leave the field empty to join as anyone.");
        ui.moderator.focus();
        break;
      }
      leaveRoom();
      showFieldError("name", error.detail || "The server refused this name's token.");
      break;
    case "banned":
      // The detail says which ban ("… from the chat" or "… from this room"); retry_after_ms is absent for good.
      bannedOut(/\bchat\b/.test(String(error.detail)) ? "chat" : "room",
        Number(error.retry_after_ms) > 0 ? Date.now() + Number(error.retry_after_ms) : null);
      break;
    case "invalid_name":
      leaveRoom();
      showFieldError("name", error.detail);
      ui.name.focus();
      break;
    case "invalid_room":
      leaveRoom();
      showFieldError("room", error.detail);
      ui.room.focus();
      break;
    case "unavailable":
      // The join could not be served; the server closes the socket and the reconnect loop takes over.
      setStatus("reconnecting", "The chat is unavailable for a moment…");
      break;
    default:
      console.warn("infinite-chat: error from the server", error);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Changes to messages: edits, deletions and reactions, ours and everyone's. Each arrives as an entry of the log after
// its message, live or in a resumed history, and carries the state it leaves: applying one twice changes nothing.

const CHANGE_TYPES = new Set(["edit", "delete", "reaction"]);
const CHANGE_VERB = { edit: "Edit not saved", delete: "Not deleted", react: "Reaction not saved" };
const CHANGE_PROBLEMS = {
  invalid_id: "the server did not take this message's id.",
  invalid_reaction: "that reaction is not one of the 12 the chat has.",
  unknown_message: "the server no longer keeps this message, so it cannot be changed.",
  not_yours: "only the person who sent a message can edit or delete it.",
  edit_window_closed: "too late to edit: a message can be edited for 15 minutes after it is sent.",
  message_deleted: "this message was deleted.",
  too_many_reactions: "this message has as many reactions as it can hold.",
};

function onChange(change) {
  if (change.room !== undefined && change.room !== chat.room) return;
  noteLogId(change.id);
  const ours = typeof change.ref === "string" ? chat.changes.get(change.ref) : undefined;
  if (ours && change.name === chat.name) chat.changes.delete(change.ref);
  const record = chat.shown.get(change.target);
  if (!record) {
    // A message older than what is shown; a scroll-back page on its way may bring it (as it was when read).
    if (chat.orphans) chat.orphans.push(change);
    return;
  }
  if (ours) {
    record.busy.delete(ours.frame.emoji);
    // Our change went through: its "Saving…" goes, and an edit or deletion ends an earlier failure's note.
    if (record.note?.kind === "wait" || ours.kind !== "react") record.note = null;
  }
  applyChange(record, change);
  rerender(record);
}

function applyChange(record, change) {
  switch (change.type) {
    case "edit":
      // A resumed history shows a message as it now is, then the edits made meanwhile: an older one is not undone.
      if (record.deleted || typeof change.text !== "string" || (record.edited && change.ts < record.edited)) return;
      record.text = change.text;
      record.mentions = strings(change.mentions);
      record.edited = String(change.ts);
      break;
    case "delete":
      if (change.moderated === true && !record.deleted) {
        record.moderated = true;
        record.reason = typeof change.reason === "string" && change.reason ? change.reason : null;
      }
      markDeleted(record, String(change.ts));
      break;
    case "reaction":
      if (!record.deleted) setReaction(record, change.emoji, String(change.name), change.on !== false, change.count);
      break;
    default:
  }
}

function markDeleted(record, ts) {
  record.deleted = record.deleted || ts;
  record.text = "";
  record.mentions = [];
  record.reactions.clear();
  record.busy.clear();
  if (menu.record === record) closeMenu();
  if (chat.editing?.id === record.id) {
    stopEditing();
    ui.textError.textContent = "The message you were editing was deleted.";
  }
}

// `count` is absolute (how many names have it now); the names are a set.
function setReaction(record, emoji, name, on, count) {
  if (typeof emoji !== "string") return;
  let reaction = record.reactions.get(emoji);
  if (!reaction) {
    if (!on) return;
    reaction = { count: 0, names: [], mine: false };
    record.reactions.set(emoji, reaction);
  }
  const at = reaction.names.indexOf(name);
  if (on && at < 0 && reaction.names.length < REACTION_NAMES_KEEP) reaction.names.push(name);
  if (!on && at >= 0) reaction.names.splice(at, 1);
  if (name === chat.name) reaction.mine = on;
  reaction.count = Number.isInteger(count) ? count : Math.max(reaction.names.length, reaction.count + (on ? 1 : -1));
  if (reaction.count <= 0) record.reactions.delete(emoji);
}

function sendChange(record, frame) {
  refCounter += 1;
  const ref = `${clientId}-${refCounter}`;
  const change = { ref, kind: frame.type, record, frame: { ...frame, id: record.id, ref }, state: "queued", tries: 0 };
  chat.changes.set(ref, change);
  if (frame.type === "react") record.busy.add(frame.emoji);
  else record.note = { text: frame.type === "edit" ? "Saving…" : "Deleting…", kind: "wait" };
  rerender(record);
  flush();
  return change;
}

// Changes go before messages (a click should not wait behind a long queue); both share the rate limit's pauses.
function flushChanges(ws) {
  for (const change of chat.changes.values()) {
    if (change.state !== "queued") continue;
    ws.send(JSON.stringify(change.frame));
    change.state = "sent";
  }
}

function changeDone(change) {
  chat.changes.delete(change.ref);
  change.record.busy.delete(change.frame.emoji);
}

function changeError(change, error) {
  const { record, frame } = change;
  switch (error.code) {
    case "no_change":
      // The message is as asked already (a change sent again after a reconnect, or a reaction past the 10 names a
      // message object lists): done.
      changeDone(change);
      record.note = null;
      if (frame.type === "react") {
        const reaction = record.reactions.get(frame.emoji);
        if (frame.on && !reaction) setReaction(record, frame.emoji, chat.name, true, 1);
        else if (reaction) {
          reaction.mine = frame.on;
          const at = reaction.names.indexOf(chat.name);
          if (frame.on && at < 0) reaction.names.unshift(chat.name);
          if (!frame.on && at >= 0) reaction.names.splice(at, 1);
        }
      } else if (frame.type === "edit") {
        record.text = frame.text;
      } else {
        markDeleted(record, new Date(serverNow()).toISOString());
      }
      break;
    case "rate_limited": {
      const ms = Number(error.retry_after_ms) > 0 ? Number(error.retry_after_ms) : 1000;
      change.state = "queued";
      if (frame.type !== "react") record.note = { text: `Slow down: trying again in ${Math.max(1, Math.ceil(ms / 1000))} s…`, kind: "wait" };
      pause(ms);
      break;
    }
    case "unavailable":
    case "not_joined":
      change.state = "queued";
      change.tries += 1;
      if (frame.type !== "react") record.note = { text: "Not saved yet, retrying…", kind: "wait" };
      pause(Math.min(BACKOFF_CAP_MS, BACKOFF_FIRST_MS * 2 ** change.tries));
      break;
    case "message_deleted":
      changeDone(change);
      record.note = null;
      markDeleted(record, new Date(serverNow()).toISOString());
      break;
    default: {
      changeDone(change);
      let reason = CHANGE_PROBLEMS[error.code];
      if (error.code === "quota_exceeded" || error.code === "too_many_rooms") {
        const minutes = Math.max(1, Math.ceil(Number(error.retry_after_ms || 0) / 60000));
        reason = `${error.detail || "too much sent from your address."} (about ${minutes} min)`;
      } else if (!reason) {
        reason = error.detail || error.code;
      }
      let action;
      if (error.code === "edit_window_closed") {
        record.editClosed = true;
        action = { label: "Send as a new message", run: () => useAsDraft(frame.text) };
      } else if (frame.type === "edit" && (error.code === "too_long" || error.code === "invalid_text")) {
        action = { label: "Edit again", run: () => startEditing(record, frame.text) };
      }
      record.note = { text: `${CHANGE_VERB[frame.type]}: ${reason}`, kind: "failed", action };
    }
  }
  rerender(record);
}

// A message the server held back goes back into the box, before whatever was typed since (nothing is lost).
function backToComposer(text) {
  if (chat.editing) chat.editing.draft = chat.editing.draft ? `${text}\n${chat.editing.draft}` : text;
  else ui.text.value = ui.text.value ? `${text}\n${ui.text.value}` : text;
  updateCounter();
}

function useAsDraft(text) {
  stopEditing();
  ui.text.value = text;
  updateCounter();
  ui.text.focus();
}

function toggleReaction(record, emoji) {
  if (record.deleted || record.busy.has(emoji)) return;
  const mine = Boolean(record.reactions.get(emoji)?.mine);
  sendChange(record, { type: "react", emoji, on: !mine });
}

// ---------------------------------------------------------------------------------------------------------------
// Editing, in the composer: a clear "Editing" bar, Enter saves, Escape cancels; what was typed before comes back.

function startEditing(record, text = record.text) {
  closeMenu();
  if (!canEdit(record)) {
    ui.textError.textContent = record.deleted
      ? "That message was deleted."
      : "Too late to edit: a message can be edited for 15 minutes after it is sent.";
    return false;
  }
  const before = chat.editing && chat.shown.get(chat.editing.id);
  chat.editing = { id: record.id, draft: chat.editing ? chat.editing.draft : ui.text.value };
  if (before) render(before);
  ui.sendForm.classList.add("editing");
  ui.editing.hidden = false;
  ui.send.textContent = "Save";
  ui.text.setAttribute("aria-describedby", "editing-text composer-help counter text-error");
  ui.text.value = text;
  ui.textError.textContent = "";
  updateCounter();
  render(record);
  ui.text.focus();
  ui.text.setSelectionRange(ui.text.value.length, ui.text.value.length);
  record.el.scrollIntoView({ block: "nearest" });
  return true;
}

function stopEditing() {
  if (!chat.editing) return;
  const record = chat.shown.get(chat.editing.id);
  ui.text.value = chat.editing.draft;
  chat.editing = null;
  ui.sendForm.classList.remove("editing");
  ui.editing.hidden = true;
  ui.send.textContent = "Send";
  ui.text.setAttribute("aria-describedby", "composer-help counter text-error");
  updateCounter();
  if (record) render(record);
}

function saveEdit() {
  const record = chat.shown.get(chat.editing.id);
  const text = strip(ui.text.value);
  if (!record || record.deleted) {
    stopEditing();
    return;
  }
  if (!text) {
    ui.textError.textContent = "A message needs some text. To remove it, choose Delete in its menu.";
    return;
  }
  const problem = textProblem(text);
  ui.textError.textContent = problem || "";
  if (problem) return;
  stopEditing();
  if (text !== record.text) sendChange(record, { type: "edit", text });
  ui.text.focus();
}

function lastOwnRecord() {
  for (let node = ui.messages.lastElementChild; node; node = node.previousElementSibling) {
    const record = node.dataset.id && chat.shown.get(node.dataset.id);
    if (record && isOwn(record) && !record.deleted) return record;
  }
  return null;
}

// ---------------------------------------------------------------------------------------------------------------
// The message menu: reactions, Edit, Delete (asked twice). From the "⋯" button (hover, focus, always on touch
// screens), a right click, or a long press.

const menu = { record: null, opener: null, confirming: false };

for (const emoji of REACTIONS) {
  const button = el("button", "pick", emoji);
  button.type = "button";
  button.dataset.emoji = emoji;
  button.setAttribute("aria-label", `React with ${emoji}`);
  ui.menuReactions.append(button);
}

function openMenu(record, opener) {
  if (record.deleted) return;
  closeNameMenu({ refocus: false });
  if (menu.record && menu.record !== record) closeMenu({ refocus: false });
  menu.record = record;
  menu.opener = opener || record.el.querySelector(".more");
  menu.confirming = false;
  const own = isOwn(record);
  ui.menuEdit.hidden = !canEdit(record);
  // A moderator deletes anyone's message (with a reason, if they give one); others only their own.
  ui.menuDelete.hidden = !own && !chat.moderator;
  ui.menuDelete.textContent = "Delete";
  ui.menuKeep.hidden = true;
  ui.menuReasonField.hidden = true;
  ui.menuReason.value = "";
  ui.menuNote.textContent = own && ui.menuEdit.hidden ? "Editing is over: a message can be edited for 15 minutes." : "";
  ui.menuNote.hidden = !ui.menuNote.textContent;
  for (const button of ui.menuReactions.children) {
    button.setAttribute("aria-pressed", String(Boolean(record.reactions.get(button.dataset.emoji)?.mine)));
  }
  ui.menu.setAttribute("aria-label", `Actions for ${own ? "your" : `${record.name}'s`} message`);
  ui.menu.hidden = false;
  placeMenu();
  record.el.querySelector(".more")?.setAttribute("aria-expanded", "true");
  record.el.classList.add("menu-open");
  ui.menuReactions.firstElementChild.focus();
}

function placeMenu() {
  const phone = matchMedia("(max-width: 40rem)").matches;
  ui.menu.classList.toggle("sheet", phone);
  if (phone) {
    ui.menu.style.removeProperty("left");
    ui.menu.style.removeProperty("top");
    return;
  }
  const anchor = (menu.opener?.isConnected ? menu.opener : menu.record.el).getBoundingClientRect();
  const box = ui.menu.getBoundingClientRect();
  const left = Math.min(Math.max(8, anchor.right - box.width), innerWidth - box.width - 8);
  const below = anchor.bottom + 4;
  const top = below + box.height < innerHeight - 8 ? below : Math.max(8, anchor.top - box.height - 4);
  ui.menu.style.setProperty("left", `${left}px`);
  ui.menu.style.setProperty("top", `${top}px`);
}

function closeMenu({ refocus = true } = {}) {
  const record = menu.record;
  if (!record) return;
  menu.record = null;
  ui.menu.hidden = true;
  record.el.querySelector(".more")?.setAttribute("aria-expanded", "false");
  record.el.classList.remove("menu-open");
  if (refocus) (record.el.querySelector(".more") || ui.text).focus();
}

ui.menu.addEventListener("click", (event) => {
  const record = menu.record;
  const button = event.target.closest("button");
  if (!record || !button) return;
  if (button.dataset.emoji) {
    closeMenu();
    toggleReaction(record, button.dataset.emoji);
  } else if (button === ui.menuEdit) {
    startEditing(record);
  } else if (button === ui.menuDelete && !menu.confirming) {
    menu.confirming = true;
    const moderating = !isOwn(record);
    ui.menuNote.textContent = moderating
      ? `Remove ${record.name}'s message for everyone? Everyone sees it was removed by a moderator.`
      : "Delete this message for everyone?";
    ui.menuNote.hidden = false;
    ui.menuReasonField.hidden = !moderating;
    ui.menuDelete.textContent = "Yes, delete";
    ui.menuKeep.hidden = false;
    ui.menuEdit.hidden = true;
    (moderating ? ui.menuReason : ui.menuDelete).focus();
  } else if (button === ui.menuDelete) {
    const reason = isOwn(record) ? "" : strip(ui.menuReason.value).slice(0, REASON_MAX);
    closeMenu();
    if (chat.editing?.id === record.id) stopEditing();
    sendChange(record, reason ? { type: "delete", reason } : { type: "delete" });
  } else if (button === ui.menuKeep) {
    closeMenu();
  }
});

ui.menu.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    event.preventDefault();
    closeMenu();
    return;
  }
  // Arrow keys move through the menu's buttons, as well as Tab does.
  if (event.target === ui.menuReason) {
    // Enter in the reason confirms; the arrows move the caret.
    if (event.key === "Enter") {
      event.preventDefault();
      ui.menuDelete.click();
    }
    return;
  }
  const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
  if (!step) return;
  const buttons = [...ui.menu.querySelectorAll("button")].filter((button) => !button.hidden);
  const at = buttons.indexOf(document.activeElement);
  event.preventDefault();
  buttons[(at + step + buttons.length) % buttons.length].focus();
});

ui.menu.addEventListener("focusout", (event) => {
  if (menu.record && !ui.menu.contains(event.relatedTarget) && event.relatedTarget) closeMenu({ refocus: false });
});

document.addEventListener("pointerdown", (event) => {
  if (menu.record && !ui.menu.contains(event.target) && !event.target.closest?.(".more")) closeMenu({ refocus: false });
});

function recordAt(target) {
  const li = target.closest?.("#messages > li.msg");
  return li ? chat.shown.get(li.dataset.id) : undefined;
}

ui.messages.addEventListener("click", (event) => {
  const record = recordAt(event.target);
  if (!record) return;
  const more = event.target.closest(".more");
  const chip = event.target.closest(".reaction");
  if (more) {
    if (menu.record === record) closeMenu();
    else openMenu(record, more);
  } else if (chip) {
    toggleReaction(record, chip.dataset.emoji);
  }
});

// A long press (touch) or a right click (mouse) opens the menu of the message under it.
let press = null;
ui.messages.addEventListener("pointerdown", (event) => {
  if (event.pointerType === "mouse" || event.target.closest("button")) return;
  const record = recordAt(event.target);
  if (!record) return;
  press = { x: event.clientX, y: event.clientY, timer: setTimeout(() => {
    press = null;
    openMenu(record);
  }, LONG_PRESS_MS) };
});
for (const type of ["pointerup", "pointercancel"]) {
  ui.messages.addEventListener(type, () => {
    if (press) clearTimeout(press.timer);
    press = null;
  });
}
ui.messages.addEventListener("pointermove", (event) => {
  if (press && Math.hypot(event.clientX - press.x, event.clientY - press.y) > 10) {
    clearTimeout(press.timer);
    press = null;
  }
});
ui.messages.addEventListener("contextmenu", (event) => {
  const record = recordAt(event.target);
  if (!record || record.deleted) return;
  event.preventDefault();
  if (press) clearTimeout(press.timer);
  press = null;
  openMenu(record);
});
addEventListener("resize", () => {
  if (menu.record) placeMenu();
});
ui.log.addEventListener("scroll", () => {
  if (menu.record) placeMenu();
}, { passive: true });

// ---------------------------------------------------------------------------------------------------------------
// Typing: ours goes out at most every 3 s while the composer has text; everyone else's shows under the conversation.

function noteTyping() {
  clearTimeout(chat.typingTimer);
  chat.typingTimer = 0;
  if (chat.editing || !strip(ui.text.value)) return;
  const ws = chat.ws;
  if (!ws || !chat.joined || ws.readyState !== WebSocket.OPEN) return;
  const wait = chat.typedAt + TYPING_EVERY_MS - Date.now();
  if (wait > 0) {
    // Typed again within the 3 s: tell the room when they are up (unless the message is sent first).
    chat.typingTimer = setTimeout(noteTyping, wait);
    return;
  }
  chat.typedAt = Date.now();
  ws.send('{"type":"typing"}');
}

function typingEnded() {
  clearTimeout(chat.typingTimer);
  chat.typingTimer = 0;
}

function onTyping(obj) {
  if (obj.room !== undefined && obj.room !== chat.room) return;
  typing.names = strings(obj.names);
  typing.count = Number.isInteger(obj.count) ? obj.count : typing.names.length;
  clearTimeout(typing.staleTimer);
  typing.staleTimer = typing.count > 0 ? setTimeout(() => setTyping([], 0), TYPING_STALE_MS) : 0;
  showTyping();
}

function setTyping(names, count) {
  clearTimeout(typing.staleTimer);
  typing.staleTimer = 0;
  typing.names = names;
  typing.count = count;
  showTyping();
}

// A message from a typist ends their typing at once, before the server says so.
function stoppedTyping(name) {
  const at = typing.names.indexOf(name);
  typing.announced.delete(name);
  if (at < 0) return;
  typing.names.splice(at, 1);
  typing.count = Math.max(typing.names.length, typing.count - 1);
  showTyping();
}

function typingText(names, count) {
  if (count <= 0) return "";
  if (!names.length) return count === 1 ? "Someone is typing…" : `${count} people are typing…`;
  if (count === 1) return `${names[0]} is typing…`;
  if (count === 2 && names.length >= 2) return `${names[0]} and ${names[1]} are typing…`;
  return `${names[0]} and ${count - 1 === 1 ? "1 other" : `${count - 1} others`} are typing…`;
}

function showTyping() {
  const others = typing.names.filter((name) => name !== chat.name);
  const count = Math.max(others.length, typing.count - (typing.names.includes(chat.name) ? 1 : 0));
  ui.typing.textContent = typingText(others, count);
  // Screen readers hear each person once per burst of typing; a burst ends when they are off a complete list.
  if (count <= others.length) {
    for (const name of typing.announced) if (!others.includes(name)) typing.announced.delete(name);
  }
  const fresh = others.filter((name) => !typing.announced.has(name));
  if (fresh.length) {
    for (const name of fresh) typing.announced.add(name);
    ui.typingAnnounce.textContent = typingText(fresh, fresh.length);
  }
}

function clearTyping() {
  setTyping([], 0);
  typing.announced.clear();
  ui.typingAnnounce.textContent = "";
}

// ---------------------------------------------------------------------------------------------------------------
// The tab's title counts what came while it was hidden: "(3) #lobby", "(3 · @1) #lobby" with mentions of us.

function updateTitle() {
  if (!chat.room || ui.chatView.hidden) return;
  const mentions = chat.mentionsHidden ? ` · @${chat.mentionsHidden}` : "";
  const unread = chat.unreadHidden ? `(${chat.unreadHidden}${mentions}) ` : "";
  document.title = `${unread}#${chat.room} · Infinite Chat`;
}

// ---------------------------------------------------------------------------------------------------------------
// Sending: every message is pending until its echo (same ref) arrives; failures are retried or explained.

function send(text) {
  refCounter += 1;
  const ref = `${clientId}-${refCounter}`;
  const li = bubble(chat.name, text, new Date(), true);
  li.classList.add("pending");
  li.dataset.ref = ref;
  const note = el("p", "note", "Sending…");
  note.setAttribute("role", "status");
  li.append(note);
  ui.pending.append(li);
  scrollToBottom();
  chat.pending.set(ref, { ref, text, state: "queued", tries: 0, el: li, note });
  flush();
}

function flush() {
  clearTimeout(chat.flushTimer);
  chat.flushTimer = 0;
  const ws = chat.ws;
  if (!ws || !chat.joined || ws.readyState !== WebSocket.OPEN) {
    for (const item of chat.pending.values()) if (item.state === "queued") setNote(item, "Waiting for the connection…");
    return;
  }
  const wait = chat.pauseUntil - Date.now();
  if (wait > 0) {
    chat.flushTimer = setTimeout(flush, wait);
    return;
  }
  flushChanges(ws);
  const items = [...chat.pending.values()];
  if (!items.some((item) => item.state === "queued" || item.state === "sent")) chat.oneAtATime = false;
  let inFlight = items.filter((item) => item.state === "sent").length;
  if (inFlight > 0 && !chat.oneAtATime) return; // the batch on its way first
  // In order: a message held back by the rate limit is not overtaken by the ones after it. After a rate limit,
  // one at a time, so a long queue does not spend the refilled allowance on frames that are refused anyway.
  for (const item of items) {
    if (chat.oneAtATime && item.state === "sent") return;
    if (item.state !== "queued") continue;
    if (inFlight >= SEND_AHEAD) return; // the batch's last answer sends the next one
    ws.send(JSON.stringify({ type: "say", text: item.text, ref: item.ref }));
    inFlight += 1;
    item.state = "sent";
    setNote(item, "Sending…");
    if (chat.oneAtATime) return;
  }
}

function pause(ms) {
  chat.pauseUntil = Math.max(chat.pauseUntil, Date.now() + ms);
  clearTimeout(chat.flushTimer);
  chat.flushTimer = setTimeout(flush, chat.pauseUntil - Date.now());
}

function requeueSent(note) {
  for (const item of chat.pending.values()) {
    if (item.state === "sent") item.state = "queued";
    if (item.state === "queued") setNote(item, note);
  }
}

function setNote(item, text, kind = "") {
  item.note.textContent = text;
  item.el.dataset.note = kind;
}

function pendingError(item, error) {
  switch (error.code) {
    case "rate_limited": {
      const ms = Number(error.retry_after_ms) > 0 ? Number(error.retry_after_ms) : 1000;
      item.state = "queued";
      chat.oneAtATime = true;
      setNote(item, `Slow down: sending again in ${Math.max(1, Math.ceil(ms / 1000))} s…`, "wait");
      pause(ms);
      break;
    }
    case "unavailable":
    case "not_joined": {
      item.state = "queued";
      item.tries += 1;
      setNote(item, "Not sent, retrying…", "wait");
      pause(Math.min(BACKOFF_CAP_MS, BACKOFF_FIRST_MS * 2 ** item.tries));
      break;
    }
    case "quota_exceeded":
    case "too_many_rooms": {
      const minutes = Math.max(1, Math.ceil(Number(error.retry_after_ms || 0) / 60000));
      fail(item, `${error.detail || "Not sent."} (about ${minutes} min)`);
      break;
    }
    case "muted":
    case "slow_mode": {
      // Held back by a moderator's rule: the text goes back into the composer (nothing is lost), and the line
      // above the composer says until when.
      const ms = Number(error.retry_after_ms) > 0 ? Number(error.retry_after_ms) : 0;
      dropPending(item.ref);
      backToComposer(item.text);
      if (error.code === "muted") {
        ui.textError.textContent = "Not sent: you are muted here. Your message is back in the box.";
      } else {
        ui.textError.textContent = `Slow mode: you can send again in ${waitText(ms || 1000)}. Your message is back in the box.`;
      }
      flush();
      break;
    }
    case "too_long":
      fail(item, `Not sent: too long. A message has at most ${TEXT_MAX} characters.`);
      break;
    case "invalid_text":
      fail(item, `Not sent: ${error.detail || "the server refused this text."}`);
      break;
    default:
      fail(item, `Not sent: ${error.detail || error.code}`);
  }
}

function fail(item, text) {
  item.state = "failed";
  setNote(item, text, "failed");
  item.el.classList.add("failed");
  const edit = el("button", "quiet", "Edit");
  edit.type = "button";
  edit.addEventListener("click", () => {
    ui.text.value = item.text;
    updateCounter();
    dropPending(item.ref);
    ui.text.focus();
  });
  const discard = el("button", "quiet", "Discard");
  discard.type = "button";
  discard.addEventListener("click", () => {
    dropPending(item.ref);
    ui.text.focus();
  });
  item.note.append(" ", edit, " ", discard);
  flush(); // the ones after it need not wait for it
}

function dropPending(ref) {
  const item = chat.pending.get(ref);
  if (!item) return;
  item.el.remove();
  chat.pending.delete(ref);
}

function updateCounter() {
  const n = length(strip(ui.text.value));
  ui.counter.hidden = n < COUNTER_FROM;
  ui.counter.textContent = `${n} / ${TEXT_MAX}`;
  ui.counter.classList.toggle("over", n > TEXT_MAX);
  if (ui.textError.textContent && !textProblem(strip(ui.text.value))) ui.textError.textContent = "";
}

// ---------------------------------------------------------------------------------------------------------------
// Scroll-back: older messages through the HTTP API as the reader reaches the top.

function maybeLoadOlder() {
  if (chat.more && !chat.loadingOlder && ui.log.scrollTop < NEAR_EDGE_PX && !ui.chatView.hidden) loadOlder();
}

// Network hiccups (and a 503 while Redis is away for a moment) get two more tries before the reader is asked.
async function fetchJson(url) {
  let problem;
  for (let attempt = 0; attempt < API_TRIES; attempt += 1) {
    if (attempt) await new Promise((resolve) => setTimeout(resolve, BACKOFF_FIRST_MS * 2 ** attempt));
    let response;
    try {
      response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
    } catch (error) {
      problem = error;
      continue;
    }
    if (response.ok) return response.json();
    problem = new Error(`HTTP ${response.status}`);
    if (response.status < 500) break; // a bad request stays bad
  }
  throw problem;
}

function fetchOlder(room, before) {
  const query = new URLSearchParams({ before, limit: String(PAGE_SIZE) });
  return fetchJson(`/api/rooms/${encodeURIComponent(room)}/messages?${query}`);
}

async function loadOlder() {
  if (chat.loadingOlder || !chat.more || !chat.oldestId) return;
  const generation = chat.generation;
  chat.loadingOlder = true;
  setOlder("loading");
  // A page shows its messages as they were when it was read; changes to them that arrive while it is on its way
  // may be newer than that, so they are kept and applied to it (applying one it shows already changes nothing).
  chat.orphans = [];
  try {
    const page = await fetchOlder(chat.room, chat.oldestId);
    if (generation !== chat.generation) return;
    const messages = Array.isArray(page.messages) ? page.messages : [];
    const fragment = document.createDocumentFragment();
    for (const message of messages) if (message?.type === "message" && remember(message)) fragment.append(messageElement(message));
    const orphans = chat.orphans;
    chat.orphans = null;
    for (const change of orphans) {
      const record = chat.shown.get(change.target);
      if (record) {
        applyChange(record, change);
        render(record);
      }
    }
    // Keep what the reader is looking at in place while content grows above it.
    const log = ui.log;
    const height = log.scrollHeight;
    const top = log.scrollTop;
    ui.messages.prepend(fragment);
    log.scrollTop = top + (log.scrollHeight - height);
    chat.more = Boolean(page.more) && messages.length > 0;
    setOlder(chat.more ? "idle" : "start");
  } catch (error) {
    if (generation !== chat.generation) return;
    console.warn("infinite-chat: older messages", error);
    setOlder("failed");
  } finally {
    if (generation === chat.generation) {
      chat.orphans = null;
      chat.loadingOlder = false;
      // Still at the top (a tall screen, or a short page): keep going.
      if (ui.older.dataset.state === "idle") requestAnimationFrame(maybeLoadOlder);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Moderation (docs/protocol.md, "Moderation"): a moderator's tools (a name's menu, slow mode, deleting anyone's
// message), and what everyone sees of the rules: a line in the conversation for each, our own mute and the room's
// slow mode above the composer, a ban that sends the page back to the form.

const minuteFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

function durationText(seconds) {
  const units = [[86400, "day"], [3600, "hour"], [60, "minute"], [1, "second"]];
  for (const [size, unit] of units) {
    if (seconds >= size && (seconds % size === 0 || size === 1 || seconds >= size * 2)) {
      const n = Math.round(seconds / size);
      return `${n} ${unit}${n === 1 ? "" : "s"}`;
    }
  }
  return `${seconds} seconds`;
}

function untilText(ms) {
  const date = new Date(ms);
  const today = new Date().toDateString() === date.toDateString();
  return (today ? minuteFormat : dayTimeFormat).format(date);
}

function resetRules() {
  setModerator(false);
  setMuted(0);
  setSlow(0);
  chat.banned = null;
  chat.modActions.clear();
  closeNameMenu({ refocus: false });
}

function setModerator(on) {
  const changed = chat.moderator !== on;
  chat.moderator = on;
  ui.moderatorBadge.hidden = !on;
  ui.modBar.hidden = !on;
  if (!on) ui.slowError.textContent = "";
  if (changed) {
    // Names become buttons (or stop being ones) everywhere they are shown.
    for (const record of chat.shown.values()) render(record);
    showOnline();
  }
}

function setMuted(until) {
  clearTimeout(chat.muteTimer);
  chat.muteTimer = 0;
  chat.mutedUntil = until > Date.now() ? until : 0;
  showMuted();
}

function showMuted() {
  clearTimeout(chat.muteTimer);
  chat.muteTimer = 0;
  const left = chat.mutedUntil - Date.now();
  if (!chat.mutedUntil || left <= 0) {
    chat.mutedUntil = 0;
    ui.mutedLine.hidden = true;
    ui.mutedLine.textContent = "";
    return;
  }
  ui.mutedLine.hidden = false;
  // Rounded, not ceiled: a 10-minute mute reads "10 min left", not 11, in its first half minute.
  const minutes = Math.round(left / 60000);
  const remaining = left < 60000 ? `${Math.max(1, Math.ceil(left / 1000))} s` : `${minutes} min`;
  ui.mutedLine.textContent = `You are muted here until ${untilText(chat.mutedUntil)} (${remaining} left): you can read, but not send, edit or react.`;
  // Kept up to date, and gone when the mute ends.
  chat.muteTimer = setTimeout(showMuted, Math.min(left, left > 60000 ? 30000 : 1000));
}

function setSlow(seconds) {
  chat.slowSeconds = Number.isInteger(seconds) && seconds > 0 ? seconds : 0;
  ui.slowLine.hidden = !chat.slowSeconds;
  ui.slowLine.textContent = chat.slowSeconds ? `Slow mode: one message every ${slowText(chat.slowSeconds)}${chat.moderator ? " (moderators are not held back)" : ""}.` : "";
  ui.slowMode.value = String(chat.slowSeconds);
  if (ui.slowMode.value !== String(chat.slowSeconds)) {
    // A value the page does not offer (another client set it): shown as it is.
    const option = el("option", "", slowText(chat.slowSeconds));
    option.value = String(chat.slowSeconds);
    ui.slowMode.append(option);
    ui.slowMode.value = option.value;
  }
}

function slowText(seconds) {
  return seconds % 60 === 0 && seconds >= 120 ? `${seconds / 60} min` : `${seconds} s`;
}

function isMe(name) {
  return typeof name === "string" && chat.name !== null && nameKey(name) === nameKey(chat.name);
}

function moderationText(obj) {
  const by = typeof obj.by === "string" ? obj.by : "a moderator";
  const name = typeof obj.name === "string" ? obj.name : "someone";
  const seconds = obj.seconds;
  const reason = typeof obj.reason === "string" && obj.reason ? ` (${obj.reason})` : "";
  // Not a switch: tests/unit/test_protocol_codes.py reads the page's `case` labels as codes and object types.
  if (obj.action === "mute") {
    return seconds === 0 ? `${name} was unmuted by ${by}${reason}` : `${name} was muted for ${durationText(seconds)} by ${by}${reason}`;
  }
  if (obj.action === "ban" || obj.action === "ban_chat") {
    const where = obj.action === "ban" ? "the room" : "the chat";
    if (seconds === 0) return `${name} was unbanned from ${where} by ${by}${reason}`;
    const time = Number.isInteger(seconds) ? ` for ${durationText(seconds)}` : " for good";
    return `${name} was banned from ${where}${time} by ${by}${reason}`;
  }
  if (obj.action === "slow") {
    return seconds ? `${by} turned slow mode on: one message every ${slowText(seconds)}${reason}` : `${by} turned slow mode off${reason}`;
  }
  return `${by} changed a rule of the room${reason}`;
}

function onModeration(obj) {
  if (obj.room !== undefined && obj.room !== chat.room && obj.action !== "ban_chat") return;
  appendNote(systemElement(moderationText(obj), "system moderation"));
  const until = typeof obj.until === "string" ? Date.parse(obj.until) - chat.clockSkew : NaN;
  if (obj.action === "slow") setSlow(obj.seconds);
  else if (obj.action === "mute" && isMe(obj.name)) setMuted(obj.seconds === 0 || Number.isNaN(until) ? 0 : until);
  else if ((obj.action === "ban" || obj.action === "ban_chat") && isMe(obj.name) && obj.seconds !== 0) {
    // The server closes our socket with 4003 next: this says which ban, and until when.
    chat.banned = { scope: obj.action === "ban" ? "room" : "chat", until: Number.isNaN(until) ? null : until };
  }
  if (obj.by === chat.name) modActionDone(obj);
}

// Back to the form, not reconnecting: a ban would refuse the join.
function bannedOut(scope, until) {
  leaveRoom();
  const where = scope === "chat" ? "from the chat" : "from this room";
  const when = until ? ` until ${untilText(until)}` : " for good";
  showFieldError("name", `A moderator banned this name ${where}${when}.`);
  ui.name.focus();
}

function sendModeration(frame, tool) {
  const ws = chat.ws;
  if (!ws || !chat.joined || ws.readyState !== WebSocket.OPEN) {
    toolError(tool, "Not connected: try again once the page says Connected.");
    return false;
  }
  refCounter += 1;
  const ref = `${clientId}-${refCounter}`;
  chat.modActions.set(ref, { frame, tool });
  toolError(tool, "");
  ws.send(JSON.stringify({ ...frame, ref }));
  return true;
}

// The room's `moderation` object is the answer (it carries no ref): the oldest action of ours it matches is done.
function modActionDone(obj) {
  const action = obj.action === "ban_chat" ? "ban" : obj.action;
  for (const [ref, pending] of chat.modActions) {
    const { frame } = pending;
    if (frame.type !== action || (action !== "slow" && !(typeof obj.name === "string" && nameKey(obj.name) === nameKey(frame.name)))) continue;
    chat.modActions.delete(ref);
    if (pending.tool === "name" && nameMenu.name !== null && nameKey(nameMenu.name) === nameKey(frame.name)) closeNameMenu();
    return;
  }
}

function modActionError(pending, error) {
  for (const [ref, one] of chat.modActions) if (one === pending) chat.modActions.delete(ref);
  const reason = {
    not_moderator: "only moderators can do that (this page is not joined as one).",
    invalid_moderation: "the server did not take that setting.",
    rate_limited: "too many actions at once; try again in a moment.",
    unavailable: "the chat could not store it; try again.",
  }[error.code] || error.detail || error.code;
  toolError(pending.tool, `Not done: ${reason}`);
  if (pending.tool === "slow") ui.slowMode.value = String(chat.slowSeconds);
}

function failModActions(text) {
  if (!chat.modActions.size) return;
  const tools = new Set([...chat.modActions.values()].map((pending) => pending.tool));
  chat.modActions.clear();
  for (const tool of tools) toolError(tool, text);
  ui.slowMode.value = String(chat.slowSeconds);
}

function toolError(tool, text) {
  if (tool === "slow") {
    ui.slowError.textContent = text;
    return;
  }
  ui.nameMenuNote.hidden = true;
  if (nameMenu.name !== null) ui.nameMenuError.textContent = text;
  else if (text) ui.slowError.textContent = text; // the menu was closed meanwhile: said in the moderator bar
  for (const button of ui.nameMenu.querySelectorAll("button")) button.disabled = false;
}

ui.slowMode.addEventListener("change", () => {
  const seconds = Number(ui.slowMode.value);
  if (!sendModeration({ type: "slow", seconds }, "slow")) ui.slowMode.value = String(chat.slowSeconds);
});

// The name menu: a moderator's actions on one person, from their name (in a message or the online list).
const nameMenu = { name: null, opener: null };

function openNameMenu(name, opener) {
  if (!chat.moderator || isMe(name)) return;
  closeMenu({ refocus: false });
  nameMenu.name = name;
  nameMenu.opener = opener;
  ui.nameMenuTitle.textContent = name;
  ui.nameMenu.setAttribute("aria-label", `Moderator actions for ${name}`);
  ui.nameMenuReason.value = "";
  ui.nameMenuNote.hidden = true;
  ui.nameMenuError.textContent = "";
  for (const button of ui.nameMenu.querySelectorAll("button")) button.disabled = false;
  ui.nameMenu.hidden = false;
  opener?.setAttribute("aria-expanded", "true");
  const phone = matchMedia("(max-width: 40rem)").matches;
  ui.nameMenu.classList.toggle("sheet", phone);
  if (phone) {
    ui.nameMenu.style.removeProperty("left");
    ui.nameMenu.style.removeProperty("top");
  } else {
    const anchor = opener.getBoundingClientRect();
    const box = ui.nameMenu.getBoundingClientRect();
    const left = Math.min(Math.max(8, anchor.left), innerWidth - box.width - 8);
    const below = anchor.bottom + 4;
    const top = below + box.height < innerHeight - 8 ? below : Math.max(8, anchor.top - box.height - 4);
    ui.nameMenu.style.setProperty("left", `${left}px`);
    ui.nameMenu.style.setProperty("top", `${top}px`);
  }
  ui.nameMenu.querySelector("button").focus();
}

function closeNameMenu({ refocus = true } = {}) {
  if (nameMenu.name === null) return;
  nameMenu.name = null;
  ui.nameMenu.hidden = true;
  const opener = nameMenu.opener;
  nameMenu.opener = null;
  opener?.setAttribute("aria-expanded", "false");
  if (refocus) (opener?.isConnected ? opener : ui.text).focus();
}

ui.nameMenu.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button || nameMenu.name === null) return;
  const seconds = button.dataset.seconds === "forever" ? null : Number(button.dataset.seconds);
  const frame = { type: button.dataset.action, name: nameMenu.name, seconds };
  if (frame.type === "ban") frame.scope = "room";
  const reason = strip(ui.nameMenuReason.value);
  if (reason) frame.reason = reason.slice(0, REASON_MAX);
  if (sendModeration(frame, "name")) {
    for (const one of ui.nameMenu.querySelectorAll("button")) one.disabled = true;
    ui.nameMenuNote.textContent = `${button.textContent}…`;
    ui.nameMenuNote.hidden = false;
  }
});

ui.nameMenu.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    event.preventDefault();
    closeNameMenu();
    return;
  }
  if (event.target === ui.nameMenuReason) return; // arrows move the caret there
  const step = { ArrowDown: 1, ArrowUp: -1 }[event.key];
  if (!step) return;
  const items = [ui.nameMenuReason, ...ui.nameMenu.querySelectorAll("button")].filter((item) => !item.disabled);
  event.preventDefault();
  items[(items.indexOf(document.activeElement) + step + items.length) % items.length].focus();
});

ui.nameMenu.addEventListener("focusout", (event) => {
  if (nameMenu.name !== null && event.relatedTarget && !ui.nameMenu.contains(event.relatedTarget)) closeNameMenu({ refocus: false });
});

document.addEventListener("pointerdown", (event) => {
  if (nameMenu.name !== null && !ui.nameMenu.contains(event.target) && !event.target.closest?.(".name-button")) {
    closeNameMenu({ refocus: false });
  }
});

for (const list of [ui.messages, ui.online]) {
  list.addEventListener("click", (event) => {
    const button = event.target.closest?.(".name-button");
    if (!button) return;
    event.stopPropagation();
    if (nameMenu.name === button.dataset.name && nameMenu.opener === button) closeNameMenu();
    else openNameMenu(button.dataset.name, button);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Wiring

function roomFromHash() {
  const raw = location.hash.slice(1);
  if (!raw) return null;
  try {
    return normalRoom(decodeURIComponent(raw));
  } catch {
    return normalRoom(raw);
  }
}

ui.joinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const name = strip(ui.name.value);
  const room = normalRoom(ui.room.value);
  const nameError = nameProblem(ui.name.value);
  const roomError = roomProblem(room);
  showFieldError("name", nameError);
  showFieldError("room", roomError);
  showFieldError("moderator", null);
  if (nameError) ui.name.focus();
  else if (roomError) ui.room.focus();
  else {
    // A filled field makes this tab a moderator's until it is closed; an emptied one stops it.
    keepModerator(ui.moderator.value.trim() || null);
    enterRoom(name, room);
  }
});
ui.moderator.addEventListener("input", () => showFieldError("moderator", null));

for (const [input, field] of [[ui.name, "name"], [ui.room, "room"]]) {
  input.addEventListener("input", () => {
    if (input.getAttribute("aria-invalid")) {
      showFieldError(field, field === "name" ? nameProblem(input.value) : roomProblem(normalRoom(input.value)));
    }
  });
}

ui.sendForm.addEventListener("submit", (event) => {
  event.preventDefault();
  if (chat.editing) {
    saveEdit();
    return;
  }
  const text = strip(ui.text.value);
  if (!text) return;
  const problem = textProblem(text);
  ui.textError.textContent = problem || "";
  if (problem) return;
  typingEnded(); // the message ends our typing; nothing more is said about it
  send(text);
  ui.text.value = "";
  updateCounter();
});

ui.text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey) {
    event.preventDefault();
    ui.sendForm.requestSubmit();
  } else if (event.key === "Escape" && chat.editing) {
    event.preventDefault();
    stopEditing();
  } else if (event.key === "ArrowUp" && !ui.text.value && !chat.editing && !event.isComposing
             && !event.shiftKey && !event.altKey && !event.ctrlKey && !event.metaKey) {
    // Up in an empty box edits one's last message, as in most chats.
    const record = lastOwnRecord();
    if (record) {
      event.preventDefault();
      startEditing(record);
    }
  }
});
ui.text.addEventListener("input", () => {
  updateCounter();
  noteTyping();
});
ui.editCancel.addEventListener("click", () => {
  stopEditing();
  ui.text.focus();
});

ui.log.addEventListener("scroll", () => {
  chat.atBottom = nearBottom();
  if (chat.atBottom) hidePill();
  maybeLoadOlder();
}, { passive: true });
// The composer grows with its text and phones resize the page for the keyboard: a reader at the bottom stays there.
new ResizeObserver(() => {
  if (chat.atBottom) ui.log.scrollTop = ui.log.scrollHeight;
}).observe(ui.log);
ui.pill.addEventListener("click", () => {
  scrollToBottom();
  ui.text.focus();
});
ui.olderButton.addEventListener("click", () => {
  if (ui.older.dataset.state === "failed") chat.more = true;
  loadOlder();
});
ui.leave.addEventListener("click", leaveRoom);
ui.release.addEventListener("click", () => {
  if (ui.releaseConfirm.hidden) askRelease();
  else hideRelease();
});
ui.releaseYes.addEventListener("click", sendRelease);
ui.releaseKeep.addEventListener("click", () => {
  hideRelease();
  ui.release.focus();
});
ui.releaseConfirm.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !chat.releasing) {
    event.preventDefault();
    hideRelease();
    ui.release.focus();
  }
});
ui.peopleToggle.addEventListener("click", () => {
  const open = ui.peopleToggle.getAttribute("aria-expanded") !== "true";
  ui.peopleToggle.setAttribute("aria-expanded", String(open));
  ui.people.classList.toggle("open", open);
});

window.addEventListener("hashchange", () => {
  const room = roomFromHash();
  if (!room || room === chat.room) return;
  if (!ui.chatView.hidden && !roomProblem(room)) enterRoom(chat.name, room);
  else ui.room.value = room;
});
window.addEventListener("online", reconnectNow);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && chat.room && !ui.chatView.hidden) {
    chat.unreadHidden = 0;
    chat.mentionsHidden = 0;
    updateTitle();
  }
});

function start() {
  let saved = null;
  try {
    saved = localStorage.getItem(NAME_KEY);
  } catch {
    saved = null;
  }
  const room = roomFromHash();
  if (room) ui.room.value = room;
  if (saved) ui.name.value = saved;
  // A returning visitor with a valid room goes straight in; anyone else sees the form.
  if (saved && !nameProblem(saved) && !roomProblem(room ?? "lobby")) {
    enterRoom(strip(saved), room ?? "lobby");
  } else {
    showJoin(room && roomProblem(room) ? { field: "room", text: roomProblem(room) } : undefined);
  }
}

start();
