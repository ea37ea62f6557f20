// The tlvproxy web IM demo: a json-mode client (docs/websocket.md) over a
// WebSocket or, where one cannot be opened (a proxy or network that does not
// carry WebSockets), over a push session: server-sent events, or long polling
// where those fail too (docs/push-sessions.md). The page shows which it is on.
// No build step and no libraries: everything here is served by the gateway.
//
// Logging in: POST /v1/login {"user_id"} answers a token (a DEMO login: any
// user id gets one, no password). The token stays in this page's memory only.
// The WebSocket and the event stream carry it as ?access_token= (a browser
// cannot set headers on either); every other call sends it as
// `Authorization: Bearer`. The gateway takes the session's user from the
// token, so the page never says who it is.
"use strict";

const $ = (id) => document.getElementById(id);

const ui = {
  loginForm: $("login-form"),
  uid: $("uid"),
  did: $("did"),
  connect: $("connect"),
  disconnect: $("disconnect"),
  status: $("status"),
  transport: $("transport"),
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

// The WebSocket path: /ws unless the page is opened as /demo/?ws=/other/path;
// the push sessions' path likewise (?sessions=).
const WS_PATH = new URLSearchParams(location.search).get("ws") || "/ws";
const SESSIONS_PATH = new URLSearchParams(location.search).get("sessions") || "/v1/sessions";

// The link to the gateway once connected: {kind, send(text), close()}, over
// a WebSocket or a push session.
let link = null;
let token = null; // the logged-in user's token, in memory only
let nextSeq = 1;
// seq -> what to do with the response (or the per-message error) to that request.
const pending = new Map();

function setStatus(text, state) {
  ui.status.textContent = text;
  ui.status.dataset.state = state;
}

function setTransport(kind) {
  ui.transport.textContent = kind ? `Transport: ${kind}` : "";
  ui.transport.dataset.transport = kind || "";
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
  if (!link) {
    setStatus("Not connected.", "error");
    return;
  }
  const seq = nextSeq++;
  pending.set(seq, onReply);
  const text = JSON.stringify({ cmd, seq, body });
  logFrame("out", text);
  link.send(text, seq);
}

function describeError(reply) {
  if (reply.error) {
    return `${reply.error.code}: ${reply.error.message}`;
  }
  return `upstream status ${reply.status}`;
}

// One json-mode message from the gateway: an answer, an error or a push.
function onMessage(text) {
  logFrame("in", text);
  let message;
  try {
    message = JSON.parse(text);
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

function authorization() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// The WebSocket of the session; rejects when it cannot be opened.
function openWebSocket(did, onClosed) {
  return new Promise((resolve, reject) => {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    // No uid here: the gateway reads it from the token.
    const query = new URLSearchParams({ did, access_token: token });
    const socket = new WebSocket(`${scheme}//${location.host}${WS_PATH}?${query}`);
    let opened = false;
    socket.addEventListener("open", () => {
      opened = true;
      resolve({
        kind: "WebSocket",
        send: (text) => socket.send(text),
        close: () => socket.close(1000, "bye"),
      });
    });
    socket.addEventListener("message", (event) => onMessage(event.data));
    socket.addEventListener("close", (closed) => {
      if (!opened) {
        reject(new Error(`WebSocket not opened (close code ${closed.code})`));
        return;
      }
      const reason = closed.reason ? `: ${closed.reason}` : "";
      const normal = closed.code === 1000 || closed.code === 1005;
      onClosed(`close code ${closed.code}${reason}`, normal);
    });
  });
}

// A push session (docs/push-sessions.md): messages are POSTed, each answered
// by its HTTP response; pushes come over an event stream (`mode` "sse") or
// long polls ("poll"). Rejects when the stream cannot be opened.
async function openPushSession(did, mode, onClosed) {
  const created = await rest("POST", `${SESSIONS_PATH}?${new URLSearchParams({ did })}`);
  let ended = false;
  let stream = null;
  // The session ends: a `close` event, a poll that says so, an error or log out.
  const end = (why, normal) => {
    if (ended) {
      return;
    }
    ended = true;
    if (stream) {
      stream.close();
    }
    onClosed(why, normal);
  };
  const session = {
    kind: mode === "sse" ? "SSE" : "long polling",
    send: async (text, seq) => {
      let reply;
      try {
        const answer = await fetch(created.messages, {
          method: "POST",
          headers: { "Content-Type": "application/json", ...authorization() },
          body: text,
        });
        reply = await answer.text();
        if (!answer.ok) {
          // The gateway's error body, as a per-message error of this seq.
          const error = JSON.parse(reply).error;
          reply = JSON.stringify({ seq, error: { code: error.code, message: error.message } });
        }
      } catch (error) {
        reply = JSON.stringify({ seq, error: { code: "network", message: String(error) } });
      }
      onMessage(reply);
    },
    close: () => {
      fetch(`${SESSIONS_PATH}/${created.session}`, { method: "DELETE", headers: authorization() });
      end("logged out", true);
    },
  };
  // Why the gateway stopped delivering (docs/push-sessions.md "Close
  // reasons"). "replaced" means another stream or poll of this session took
  // over: this page lets it have the session rather than take it back.
  const closing = (closed) => {
    const normal = closed === "deleted" || closed === "idle_timeout";
    end(`session closed: ${closed}`, normal);
  };
  if (mode === "sse") {
    const query = new URLSearchParams({ access_token: token });
    await new Promise((resolve, reject) => {
      stream = new EventSource(`${created.events}?${query}`);
      let opened = false;
      stream.addEventListener("open", () => {
        opened = true;
        resolve();
      });
      stream.addEventListener("message", (event) => onMessage(event.data));
      stream.addEventListener("gap", (event) => logFrame("in", `gap ${event.data}`));
      stream.addEventListener("close", (event) => closing(JSON.parse(event.data).closed));
      stream.addEventListener("error", () => {
        if (!opened) {
          // The first stream did not open: no SSE here, try long polling.
          stream.close();
          fetch(`${SESSIONS_PATH}/${created.session}`, { method: "DELETE", headers: authorization() });
          reject(new Error("event stream not opened"));
        } else if (stream.readyState === EventSource.CLOSED) {
          end("event stream lost", false);
        }
        // Otherwise (CONNECTING) the browser reconnects by itself, resuming
        // with Last-Event-ID.
      });
    });
  } else {
    (async () => {
      let after = 0;
      while (!ended) {
        let answer;
        try {
          answer = await rest("GET", `${created.poll}?after=${after}`);
        } catch (error) {
          end(`poll failed: ${error.message}`, false);
          return;
        }
        for (const message of answer.messages) {
          onMessage(JSON.stringify(message));
        }
        after = answer.next;
        if (answer.closed) {
          closing(answer.closed);
        }
      }
    })();
  }
  return session;
}

// The first transport that opens: a WebSocket, else SSE, else long polling.
async function openLink(did, onClosed) {
  const failures = [];
  try {
    return await openWebSocket(did, onClosed);
  } catch (error) {
    failures.push(error.message);
  }
  for (const mode of ["sse", "poll"]) {
    const kind = mode === "sse" ? "SSE" : "long polling";
    setStatus(`WebSocket unavailable; trying ${kind}...`, "connecting");
    try {
      return await openPushSession(did, mode, onClosed);
    } catch (error) {
      failures.push(error.message);
    }
  }
  throw new Error(failures.join("; "));
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
  setStatus(`Connecting as user ${uid}...`, "connecting");
  const onClosed = (why, normal) => {
    setConnected(false);
    setTransport(null);
    pending.clear();
    token = null; // logged out: the next log in asks for a new token
    link = null;
    setStatus(`Disconnected (${why}).`, normal ? "offline" : "error");
  };
  try {
    link = await openLink(did, onClosed);
  } catch (error) {
    token = null;
    ui.connect.disabled = false;
    setStatus(`Cannot connect: ${error.message}`, "error");
    return;
  }
  setConnected(true);
  setTransport(link.kind);
  const valid = until ? `; token valid until ${until}` : "";
  setStatus(`Connected as user ${uid} (device ${did}${valid}).`, "online");
  ui.profileUid.value = uid;
  // Asking for our own profile first also tells the upstream who is on this session.
  request("get_profile", { user_id: Number(uid) }, showProfile);
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
ui.disconnect.addEventListener("click", () => link && link.close());
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
