// The tlvproxy web IM demo: a json-mode WebSocket client (docs/websocket.md).
// No build step and no libraries: everything here is served by the gateway.
//
// Logging in: POST /v1/login {"user_id"} answers a token (a DEMO login: any
// user id gets one, no password). The token stays in this page's memory only.
// The WebSocket carries it as ?access_token= (a browser cannot set headers on
// a WebSocket); REST calls send it as `Authorization: Bearer`. The gateway
// takes the session's user from the token, so the page never says who it is.
"use strict";

const $ = (id) => document.getElementById(id);

const ui = {
  loginForm: $("login-form"),
  uid: $("uid"),
  did: $("did"),
  connect: $("connect"),
  disconnect: $("disconnect"),
  status: $("status"),
  sendForm: $("send-form"),
  toUid: $("to-uid"),
  text: $("text"),
  send: $("send"),
  messages: $("messages"),
  profileForm: $("profile-form"),
  profileUid: $("profile-uid"),
  getProfile: $("get-profile"),
  profile: $("profile"),
  loadHistory: $("load-history"),
  history: $("history"),
  log: $("log"),
};

// The WebSocket path: /ws unless the page is opened as /demo/?ws=/other/path.
const WS_PATH = new URLSearchParams(location.search).get("ws") || "/ws";

let socket = null;
let token = null; // the logged-in user's token, in memory only
let nextSeq = 1;
// seq -> what to do with the response (or the per-message error) to that request.
const pending = new Map();

function setStatus(text, state) {
  ui.status.textContent = text;
  ui.status.dataset.state = state;
}

function setConnected(connected) {
  ui.connect.disabled = connected;
  ui.uid.disabled = connected;
  ui.did.disabled = connected;
  ui.disconnect.disabled = !connected;
  ui.send.disabled = !connected;
  ui.getProfile.disabled = !connected;
  ui.loadHistory.disabled = !connected;
}

function logFrame(direction, text) {
  const item = document.createElement("li");
  item.className = direction;
  item.textContent = text;
  ui.log.append(item);
  ui.log.scrollTop = ui.log.scrollHeight;
}

function timeOf(millis) {
  const date = new Date(Number(millis));
  return Number.isNaN(date.getTime()) || Number(millis) === 0 ? "" : date.toLocaleTimeString();
}

function addMessage(kind, heading, text, msgId) {
  const item = document.createElement("li");
  item.className = kind;
  if (msgId !== undefined) {
    item.dataset.msgId = String(msgId);
    item.id = `${kind}-${msgId}`;
  }
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = heading;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(meta, body);
  ui.messages.append(item);
  return item;
}

// Sends {"cmd", "seq", "body"}; `onReply(reply)` gets the response or the error.
function request(cmd, body, onReply) {
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    setStatus("Not connected.", "error");
    return;
  }
  const seq = nextSeq++;
  pending.set(seq, onReply);
  const text = JSON.stringify({ cmd, seq, body });
  logFrame("out", text);
  socket.send(text);
}

function describeError(reply) {
  if (reply.error) {
    return `${reply.error.code}: ${reply.error.message}`;
  }
  return `upstream status ${reply.status}`;
}

function onMessage(event) {
  logFrame("in", event.data);
  let message;
  try {
    message = JSON.parse(event.data);
  } catch (error) {
    setStatus(`Unreadable message from the gateway: ${error}`, "error");
    return;
  }
  if (message.push) {
    onPush(message);
    return;
  }
  const onReply = pending.get(message.seq);
  if (onReply) {
    pending.delete(message.seq);
    onReply(message);
  } else if (message.error) {
    setStatus(describeError(message), "error");
  }
}

function onPush(message) {
  if (message.cmd !== "new_message") {
    return; // other pushes only show in the protocol log
  }
  const push = message.body;
  const when = timeOf(push.sent_at);
  addMessage(
    "incoming",
    `from ${push.from_uid} to ${push.to_uid}${when ? " at " + when : ""}`,
    push.text,
    push.msg_id,
  );
}

// A REST call to the gateway; resolves to the parsed JSON answer, or throws an
// Error saying what went wrong (the gateway's error body when it sent one).
async function rest(method, path, body) {
  const headers = {};
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
  }
  if (token) {
    headers["Authorization"] = `Bearer ${token}`;
  }
  const answer = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await answer.text();
  let value = null;
  try {
    value = JSON.parse(text);
  } catch (error) {
    value = null;
  }
  if (!answer.ok) {
    // The gateway's error body: {"error": {"code", "message", "body"?}}.
    const error = value && value.error ? value.error : null;
    const why = error ? `${error.code}: ${error.message}` : text || answer.statusText;
    const detail = error && error.body && error.body.error ? ` (${error.body.error})` : "";
    throw new Error(`HTTP ${answer.status}: ${why}${detail}`);
  }
  return value;
}

async function connect(event) {
  event.preventDefault();
  const uid = ui.uid.value.trim();
  const did = ui.did.value.trim();
  if (!ui.loginForm.reportValidity()) {
    return;
  }
  ui.connect.disabled = true;
  setStatus(`Logging in as user ${uid}...`, "connecting");
  let login;
  try {
    login = await rest("POST", "/v1/login", { user_id: Number(uid) });
  } catch (error) {
    ui.connect.disabled = false;
    setStatus(`Login failed: ${error.message}`, "error");
    return;
  }
  token = login.token;
  const until = timeOf(login.expires_at);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  // No uid here: the gateway reads it from the token.
  const query = new URLSearchParams({ did, access_token: token });
  setStatus(`Connecting as user ${uid}...`, "connecting");
  socket = new WebSocket(`${scheme}//${location.host}${WS_PATH}?${query}`);
  socket.addEventListener("open", () => {
    setConnected(true);
    const valid = until ? `; token valid until ${until}` : "";
    setStatus(`Connected as user ${uid} (device ${did}${valid}).`, "online");
    ui.profileUid.value = uid;
    // Asking for our own profile first also tells the upstream who is on this session.
    request("get_profile", { user_id: Number(uid) }, showProfile);
  });
  socket.addEventListener("message", onMessage);
  socket.addEventListener("close", (closed) => {
    setConnected(false);
    pending.clear();
    token = null; // logged out: the next log in asks for a new token
    const reason = closed.reason ? `: ${closed.reason}` : "";
    const normal = closed.code === 1000 || closed.code === 1005;
    setStatus(`Disconnected (close code ${closed.code}${reason}).`, normal ? "offline" : "error");
    socket = null;
  });
}

function showProfile(reply) {
  if (reply.error || reply.status !== 0) {
    ui.profile.textContent = describeError(reply);
    return;
  }
  ui.profile.textContent = JSON.stringify(reply.body, null, 2);
}

function sendMessage(event) {
  event.preventDefault();
  if (!ui.sendForm.reportValidity()) {
    return;
  }
  const toUid = Number(ui.toUid.value);
  const text = ui.text.value;
  const item = addMessage("outgoing", `to ${toUid} (sending)`, text);
  request("send_message", { to_uid: toUid, text }, (reply) => {
    const meta = item.querySelector(".meta");
    if (reply.error || reply.status !== 0) {
      item.className = "error";
      meta.textContent = `to ${toUid}: not sent (${describeError(reply)})`;
      return;
    }
    item.dataset.msgId = String(reply.body.msg_id);
    item.id = `outgoing-${reply.body.msg_id}`;
    const when = timeOf(reply.body.sent_at);
    meta.textContent = `to ${toUid}, message ${reply.body.msg_id}${when ? " at " + when : ""}`;
  });
  ui.text.value = "";
  ui.text.focus();
}

async function loadHistory() {
  ui.history.replaceChildren();
  let answer;
  try {
    answer = await rest("GET", "/v1/me/messages?limit=20");
  } catch (error) {
    const item = document.createElement("li");
    item.className = "error";
    item.textContent = error.message;
    ui.history.append(item);
    return;
  }
  for (const message of answer.messages) {
    const item = document.createElement("li");
    item.dataset.msgId = String(message.msg_id);
    const when = timeOf(message.sent_at);
    item.textContent =
      `${message.from_uid} \u2192 ${message.to_uid}${when ? " at " + when : ""}: ${message.text}`;
    ui.history.append(item);
  }
  if (answer.messages.length === 0) {
    const item = document.createElement("li");
    item.className = "empty";
    item.textContent = "No messages yet.";
    ui.history.append(item);
  }
}

function getProfile(event) {
  event.preventDefault();
  if (!ui.profileForm.reportValidity()) {
    return;
  }
  request("get_profile", { user_id: Number(ui.profileUid.value) }, showProfile);
}

ui.loginForm.addEventListener("submit", connect);
ui.disconnect.addEventListener("click", () => socket && socket.close(1000, "bye"));
ui.sendForm.addEventListener("submit", sendMessage);
ui.profileForm.addEventListener("submit", getProfile);
ui.loadHistory.addEventListener("click", loadHistory);
// Log in and connect from the address, e.g. /demo/?uid=1&did=laptop, to open two
// users quickly: the form is filled and submitted as if "Connect" were clicked.
const params = new URLSearchParams(location.search);
if (params.get("uid")) {
  ui.uid.value = params.get("uid");
  ui.did.value = params.get("did") || ui.did.value;
  ui.loginForm.requestSubmit();
}
