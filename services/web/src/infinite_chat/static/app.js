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

const $ = (id) => document.getElementById(id);
const ui = {
  joinView: $("join-view"), joinForm: $("join-form"), name: $("name"), nameError: $("name-error"),
  room: $("room"), roomError: $("room-error"),
  chatView: $("chat-view"), roomTitle: $("room-title"), status: $("status"), statusText: $("status-text"),
  replica: $("replica"), leave: $("leave"), peopleToggle: $("people-toggle"), people: $("people"),
  onlineCount: $("online-count"), online: $("online"), onlineMore: $("online-more"),
  log: $("log"), older: $("older"), olderButton: $("older-button"), olderText: $("older-text"),
  messages: $("messages"), pending: $("pending"), pill: $("new-pill"),
  sendForm: $("send-form"), text: $("text"), counter: $("counter"), textError: $("text-error"),
  announce: $("announce"),
};

// A fresh id per page: refs are "<client>-<n>", unique among everyone's messages in practice.
const clientId = Array.from(crypto.getRandomValues(new Uint8Array(6)), (b) => b.toString(16).padStart(2, "0")).join("");
let refCounter = 0;

const chat = {
  name: null,
  room: null,
  generation: 0, // bumped on every room change, so late answers for the old room are dropped
  ws: null,
  joined: false,
  welcomed: false, // this room's view has had its first welcome (history and the "you joined" marker)
  attempt: 0,
  reconnectTimer: 0,
  lastId: null, // newest message id seen: `since` on reconnect
  oldestId: null, // oldest message id shown: `before` for scroll-back
  seen: new Set(),
  more: false,
  loadingOlder: false,
  pending: new Map(), // ref -> {ref, text, state: "queued" | "sent" | "failed", tries, el, note}
  pauseUntil: 0,
  flushTimer: 0,
  oneAtATime: false, // after a rate limit: send the next message only when the last one is through
  outage: null, // {note, since} while the connection is lost after having been up
  unreadHidden: 0,
  atBottom: true, // the reader is following the conversation at the bottom
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

function messageElement(message) {
  const li = bubble(String(message.name), String(message.text), new Date(message.ts), message.name === chat.name);
  li.dataset.id = message.id;
  return li;
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

// Adds messages at the bottom; follows them only if the reader was already at the bottom (or sent one).
function appendLive(messages, { own = false } = {}) {
  const follow = nearBottom() || own;
  const fragment = document.createDocumentFragment();
  let added = 0;
  for (const message of messages) {
    if (!remember(message)) continue;
    fragment.append(messageElement(message));
    added += 1;
  }
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
  if (typeof message.id !== "string" || chat.seen.has(message.id)) return false;
  chat.seen.add(message.id);
  if (chat.lastId === null || compareIds(message.id, chat.lastId) > 0) chat.lastId = message.id;
  if (chat.oldestId === null || compareIds(message.id, chat.oldestId) < 0) chat.oldestId = message.id;
  return true;
}

function announce(message) {
  ui.announce.textContent = `${message.name}: ${message.text}`;
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
    const li = el("li", name === chat.name ? "me" : "", name);
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
    start: chat.seen.size ? `This is the beginning of #${chat.room}.` : `No messages in #${chat.room} yet. Say hello!`,
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
  ui.peopleToggle.hidden = true;
  ui.replica.hidden = true;
  setStatus("offline", "Not connected");
  if (chat.name) ui.name.value = chat.name;
  if (chat.room) ui.room.value = chat.room;
  if (message) showFieldError(message.field, message.text);
  (message?.field === "room" ? ui.room : ui.name).focus();
  document.title = "Infinite Chat";
}

function showFieldError(field, text) {
  const input = field === "room" ? ui.room : ui.name;
  const error = field === "room" ? ui.roomError : ui.nameError;
  error.textContent = text || "";
  if (text) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

function resetConversation() {
  ui.messages.replaceChildren();
  chat.seen.clear();
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
  try {
    localStorage.setItem(NAME_KEY, name);
  } catch {
    // Private modes may refuse storage; the name is then asked again next time.
  }
  if (location.hash !== `#${room}`) history.replaceState(null, "", `#${room}`);
  document.title = `#${room} · Infinite Chat`;
  ui.roomTitle.textContent = `#${room}`;
  ui.roomTitle.hidden = false;
  ui.joinView.hidden = true;
  ui.chatView.hidden = false;
  ui.leave.hidden = false;
  ui.peopleToggle.hidden = false;
  resetOnline();
  ui.text.focus();
  connect();
}

function leaveRoom() {
  leaveSocket();
  chat.generation += 1;
  for (const item of chat.pending.values()) item.el.remove();
  chat.pending.clear();
  resetConversation();
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
    if (ws !== chat.ws) return; // closed on purpose (room change, leave)
    chat.ws = null;
    chat.joined = false;
    requeueSent("Waiting for the connection…");
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
    case "error":
      onError(obj);
      break;
    default:
      console.warn("infinite-chat: unknown object from the server", obj);
  }
}

function onWelcome(welcome) {
  chat.joined = true;
  chat.attempt = 0;
  setStatus("online", "Connected");
  setReplica(String(welcome.replica));
  resetOnline(welcome.online, welcome.online_count);
  const history = Array.isArray(welcome.history) ? welcome.history : [];
  // Messages that reached the server before the socket dropped are in the resumed history: not sent twice.
  for (const message of history) {
    if (message.ref && chat.pending.has(message.ref)) dropPending(message.ref);
  }
  if (chat.welcomed && !welcome.resumed) {
    // `since` was no longer in the room's log: what was shown has a gap after it, so start the view afresh.
    resetConversation();
  }
  if (!chat.welcomed) {
    chat.welcomed = true;
    const fragment = document.createDocumentFragment();
    for (const message of history) if (remember(message)) fragment.append(messageElement(message));
    ui.messages.append(fragment);
    if (chat.seen.size) ui.messages.append(systemElement(`You joined · ${timeFormat.format(new Date())}`, "divider"));
    chat.more = chat.seen.size > 0;
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
    flush();
  }
  if (appendLive([message], { own }) && !own) {
    announce(message);
    if (document.hidden) {
      chat.unreadHidden += 1;
      document.title = `(${chat.unreadHidden}) #${chat.room} · Infinite Chat`;
    }
  }
}

function onError(error) {
  const item = error.ref ? chat.pending.get(error.ref) : undefined;
  if (item) {
    pendingError(item, error);
    return;
  }
  switch (error.code) {
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
  try {
    const page = await fetchOlder(chat.room, chat.oldestId);
    if (generation !== chat.generation) return;
    const messages = Array.isArray(page.messages) ? page.messages : [];
    const fragment = document.createDocumentFragment();
    for (const message of messages) if (remember(message)) fragment.append(messageElement(message));
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
      chat.loadingOlder = false;
      // Still at the top (a tall screen, or a short page): keep going.
      if (ui.older.dataset.state === "idle") requestAnimationFrame(maybeLoadOlder);
    }
  }
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
  if (nameError) ui.name.focus();
  else if (roomError) ui.room.focus();
  else enterRoom(name, room);
});

for (const [input, field] of [[ui.name, "name"], [ui.room, "room"]]) {
  input.addEventListener("input", () => {
    if (input.getAttribute("aria-invalid")) {
      showFieldError(field, field === "name" ? nameProblem(input.value) : roomProblem(normalRoom(input.value)));
    }
  });
}

ui.sendForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = strip(ui.text.value);
  if (!text) return;
  const problem = textProblem(text);
  ui.textError.textContent = problem || "";
  if (problem) return;
  send(text);
  ui.text.value = "";
  updateCounter();
});

ui.text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey) {
    event.preventDefault();
    ui.sendForm.requestSubmit();
  }
});
ui.text.addEventListener("input", updateCounter);

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
    document.title = `#${chat.room} · Infinite Chat`;
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
