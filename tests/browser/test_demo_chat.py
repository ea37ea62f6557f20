"""The web IM demo in a real browser: two users log in and chat through the real
gateway, over a WebSocket and, with WebSockets blocked, over a push session
(SSE, or long polling with event streams blocked too); and a page cannot read
another user's pushes.

Headless Debian Chromium, driven by selenium through Debian's chromedriver
(`make test` installs both), loads /demo/ from a real `tlvproxy serve` in front
of a real `tlvproxy mock-upstream`, both started as processes on free ports, on
the shipped demo table (its `users` authenticator reading a key set made for
the test). A screenshot of each page lands in build/test-output/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tlvproxy.demo_keys import make_demo_keys

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "build" / "test-output"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# The flags a sandboxed, offline machine needs (no GPU, no sandbox as root, no
# background calls to Google's hosts, which this network refuses).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1000,1000",
)
START_TIMEOUT = 30.0
WAIT = 15.0


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Demo:
    base: str  # http://127.0.0.1:PORT, the gateway's REST, WebSocket and /demo/
    port: int
    partner_port: int  # where the test serves a page of the origin `cors` lists


def write_table(directory, keys):
    """The shipped demo table with free ports, an absolute proto path, the key set
    made for this test, and the test's page origins as `allowed_origins`."""
    table = yaml.safe_load((REPO / "commands.yaml").read_text())
    ports = {
        "http": free_port(),
        "admin": free_port(),
        "upstream": free_port(),
        "partner": free_port(),
    }
    table["listen"] = {
        "http": f"127.0.0.1:{ports['http']}",
        "admin": f"127.0.0.1:{ports['admin']}",
    }
    table["upstreams"]["im"]["nodes"] = [f"127.0.0.1:{ports['upstream']}"]
    table["proto"]["paths"] = [str(REPO / "proto")]
    assert table["demo"] is True
    (users,) = table["auth"]
    assert (users["name"], users["type"]) == ("users", "jwt")
    users["keys"] = str(keys)
    websocket = table["websocket"]
    assert (websocket["auth"], websocket["uid"]) == ("users", "auth.sub")
    # The shipped table admits the page of `make run`; this gateway's port differs.
    assert "http://127.0.0.1:8080" in websocket["allowed_origins"]
    websocket["allowed_origins"] = [
        f"http://127.0.0.1:{ports['http']}",
        f"http://localhost:{ports['http']}",
    ]
    # The page's fallback: push sessions with the same token.
    sessions = table["sessions"]
    assert (sessions["auth"], sessions["uid"]) == ("users", "auth.sub")
    # REST calls from one other page, the partner's (the shipped demo needs none).
    assert table.get("cors") is None
    table["cors"] = {"origins": [f"http://127.0.0.1:{ports['partner']}"], "max_age": "1m"}
    path = directory / "commands.yaml"
    path.write_text(yaml.safe_dump(table, sort_keys=False))
    return path, ports


def start(args, log):
    return subprocess.Popen(
        [sys.executable, "-m", "tlvproxy", *args],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_ready(url, processes, logs):
    """Poll `url` until it answers 200; fail with the processes' output if one exits."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for process, log in zip(processes, logs, strict=True):
            if process.poll() is not None:
                pytest.fail(f"{process.args} exited {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)  # a readiness poll for another process, not timing logic
    output = "\n".join(log.read_text() for log in logs)
    pytest.fail(f"{url} was not ready within {START_TIMEOUT} s:\n{output}")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The real mock upstream (signing demo tokens with a key made here, not in
    build/) and the gateway on the demo table; yields the `Demo`."""
    directory = tmp_path_factory.mktemp("demo")
    key, key_set = make_demo_keys(directory / "keys")
    table, ports = write_table(directory, key_set)
    logs = [directory / "upstream.log", directory / "gateway.log"]
    with logs[0].open("w") as upstream_log, logs[1].open("w") as gateway_log:
        upstream = start(
            [
                *("mock-upstream", "--listen", f"127.0.0.1:{ports['upstream']}"),
                *("--token-key", str(key), "-c", str(table)),
            ],
            upstream_log,
        )
        gateway = start(["serve", "-c", str(table)], gateway_log)
        processes = [upstream, gateway]
        try:
            wait_ready(f"http://127.0.0.1:{ports['admin']}/readyz", processes, logs)
            yield Demo(
                base=f"http://127.0.0.1:{ports['http']}",
                port=ports["http"],
                partner_port=ports["partner"],
            )
        finally:
            for process in reversed(processes):
                process.terminate()
            for process in reversed(processes):
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# What a page is made to do without: WebSockets for SSE, and event streams
# too for long polling.
BLOCKED = {
    "WebSocket": (),
    "SSE": ("websocket",),
    "long polling": ("websocket", "events"),
}
# A network that does not carry WebSockets, in every page before its own
# script runs: each WebSocket goes to a port where nothing listens, so it
# fails in Chromium's own network stack, as one a proxy refuses does.
# (DevTools' request blocking, used for event streams below, does not apply
# to WebSockets.)
NO_WEBSOCKETS = """
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  constructor(url, protocols) {
    const refused = new URL(url, location.href);
    refused.port = "1";
    super(refused.href, protocols);
  }
};
"""


def block(driver, what):
    """Make `driver`'s pages fail to open WebSockets and, with "events",
    event streams (DevTools' request blocking: a network error)."""
    if "websocket" in what:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": NO_WEBSOCKETS})
    if "events" in what:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/events?*"]})


@pytest.fixture
def browser(tmp_path):
    """A factory of headless Chromium sessions, each with a fresh profile."""
    assert Path(CHROMIUM).exists(), "chromium is missing: `make browser-deps` installs it"
    assert Path(CHROMEDRIVER).exists(), "chromedriver is missing: `make browser-deps`"
    drivers = []

    def open_browser():
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path / f'profile-{len(drivers)}'}")
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        drivers.append(driver)
        return driver

    try:
        yield open_browser
    finally:
        for driver in drivers:
            driver.quit()


def log_in(driver, demo, uid, did, *, from_the_address=True, transport="WebSocket"):
    """Open the demo page as user `uid`: from `?uid=&did=` (the page logs in and
    connects by itself) or by typing into the form and clicking Connect; the
    page must end up on `transport`."""
    if from_the_address:
        driver.get(f"{demo.base}/demo/?uid={uid}&did={did}")
        assert driver.title == "tlvproxy IM demo"
    else:
        driver.get(f"{demo.base}/demo/")
        assert driver.find_element(By.ID, "status").get_attribute("data-state") != "online"
        for field, value in (("uid", uid), ("did", did)):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(str(value))
        driver.find_element(By.ID, "connect").click()
    assert driver.find_element(By.ID, "uid").get_attribute("value") == str(uid)
    wait = WebDriverWait(driver, WAIT)
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "online")
    shown = driver.find_element(By.ID, "transport")
    assert shown.get_attribute("data-transport") == transport
    assert shown.text == f"Transport: {transport}"
    # The page asks for its own profile on connect; its answer shows the session works.
    wait.until(lambda d: d.find_element(By.ID, "profile").text.strip() != "")
    profile = json.loads(driver.find_element(By.ID, "profile").text)
    assert profile["user_id"] == uid


def send(driver, to_uid, text):
    to = driver.find_element(By.ID, "to-uid")
    to.clear()
    to.send_keys(str(to_uid))
    driver.find_element(By.ID, "text").send_keys(text)
    driver.find_element(By.ID, "send").click()


def incoming(driver, text):
    """The incoming message item with `text`, once it arrives."""
    locator = (By.CSS_SELECTOR, "#messages li.incoming")
    WebDriverWait(driver, WAIT).until(
        expected_conditions.text_to_be_present_in_element(locator, text)
    )
    items = [
        item
        for item in driver.find_elements(*locator)
        if item.find_element(By.CLASS_NAME, "text").text == text
    ]
    assert len(items) == 1
    return items[0]


def sent(driver, text):
    """The outgoing item with `text`, once the gateway has answered it."""
    WebDriverWait(driver, WAIT).until(
        lambda d: any(
            item.get_attribute("data-msg-id")
            for item in d.find_elements(By.CSS_SELECTOR, "#messages li.outgoing")
            if item.find_element(By.CLASS_NAME, "text").text == text
        )
    )
    (item,) = [
        item
        for item in driver.find_elements(By.CSS_SELECTOR, "#messages li.outgoing")
        if item.find_element(By.CLASS_NAME, "text").text == text
    ]
    return item


def history(driver):
    """The texts of "My messages" (GET /v1/me/messages with the page's token)."""
    driver.find_element(By.ID, "load-history").click()
    WebDriverWait(driver, WAIT).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#history li[data-msg-id], #history li.empty")
    )
    return [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#history li")]


@pytest.mark.parametrize("transport", list(BLOCKED))
def test_two_users_chat_through_the_gateway(gateway, browser, transport):
    alice = browser()
    bob = browser()
    block(alice, BLOCKED[transport])
    block(bob, BLOCKED[transport])
    # Distinct users per run: the demo upstream keeps every message it was sent.
    a, b = {"WebSocket": (1, 2), "SSE": (3, 4), "long polling": (5, 6)}[transport]
    log_in(alice, gateway, a, "alice-laptop", transport=transport)
    log_in(bob, gateway, b, "bob-phone", transport=transport)

    greeting = "hello bob <b>not bold</b> \u2713"
    send(alice, b, greeting)
    pushed = incoming(bob, greeting)
    assert pushed.find_element(By.CLASS_NAME, "meta").text.startswith(f"from {a} to {b}")
    assert pushed.find_elements(By.TAG_NAME, "b") == []  # text, never markup
    # The sender's item carries the msg_id of the send_message response: the same
    # message id the recipient's push carries.
    outgoing = sent(alice, greeting)
    assert outgoing.get_attribute("data-msg-id") == pushed.get_attribute("data-msg-id")

    send(bob, a, "hi alice")
    answer = incoming(alice, "hi alice")
    assert answer.find_element(By.CLASS_NAME, "meta").text.startswith(f"from {b} to {a}")
    # Alice's own message never came back to her as a push.
    assert [
        item.find_element(By.CLASS_NAME, "text").text
        for item in alice.find_elements(By.CSS_SELECTOR, "#messages li.incoming")
    ] == ["hi alice"]

    # The protocol log shows the json-mode frames of SPEC 5, whatever carries them.
    frames = [json.loads(item.text) for item in bob.find_elements(By.CSS_SELECTOR, "#log li.in")]
    push = next(frame for frame in frames if frame.get("push"))
    assert push["cmd"] == "new_message"
    assert push["body"]["text"] == greeting
    assert push["body"]["from_uid"] == a

    # Over REST with the page's bearer token: alice's own messages, both ways.
    listed = history(alice)
    assert len(listed) == 2
    assert listed[0].startswith(f"{a} \u2192 {b}")
    assert listed[0].endswith(f": {greeting}")
    assert listed[1].startswith(f"{b} \u2192 {a}")
    assert listed[1].endswith(": hi alice")

    OUTPUT.mkdir(parents=True, exist_ok=True)
    name = transport.replace(" ", "-").lower()
    assert bob.save_screenshot(str(OUTPUT / f"demo-chat-{name}.png"))
    assert alice.save_screenshot(str(OUTPUT / f"demo-chat-{name}-sender.png"))
    assert (OUTPUT / f"demo-chat-{name}.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("transport", "closed"), [("WebSocket", "close code 1000"), ("SSE", "logged out")]
)
def test_get_profile_and_disconnect(gateway, browser, transport, closed):
    page = browser()
    block(page, BLOCKED[transport])
    uid = {"WebSocket": 7, "SSE": 8}[transport]
    log_in(page, gateway, uid, "tablet", from_the_address=False, transport=transport)
    assert history(page) == ["No messages yet."]
    field = page.find_element(By.ID, "profile-uid")
    field.clear()
    field.send_keys("42")
    page.find_element(By.ID, "get-profile").click()
    WebDriverWait(page, WAIT).until(
        lambda d: '"user_id": 42' in d.find_element(By.ID, "profile").text
    )
    page.find_element(By.ID, "disconnect").click()
    status = page.find_element(By.ID, "status")
    WebDriverWait(page, WAIT).until(lambda d: status.get_attribute("data-state") == "offline")
    assert closed in status.text
    assert page.find_element(By.ID, "transport").text == ""
    assert page.find_element(By.ID, "send").get_attribute("disabled") is not None
    # Logged out, the page holds no token any more.
    assert page.execute_script("return token") is None


# ---------------------------------------------------------------- other users' pushes

# Opens a WebSocket from the page it runs in and records what happens to it in
# `window.probes[name]`: whether it opened, its close code, the messages it got.
# A probe asks for a profile once open: its first frame tells the upstream whose
# session it is (as the demo page's first request does).
PROBE = """
const [name, url] = arguments;
window.probes = window.probes || {};
const record = {opened: false, closed: null, messages: []};
window.probes[name] = record;
const socket = new WebSocket(url);
socket.onopen = () => {
  record.opened = true;
  socket.send(JSON.stringify({cmd: "get_profile", seq: 1, body: {user_id: 2}}));
};
socket.onmessage = (event) => record.messages.push(JSON.parse(event.data));
socket.onclose = (event) => { record.closed = event.code; };
"""


def probe(driver, name):
    return driver.execute_script("return window.probes[arguments[0]]", name)


def wait_probe(driver, name, condition, what):
    WebDriverWait(driver, WAIT).until(
        lambda d: condition(probe(d, name)), message=f"probe {name}: {what}"
    )
    return probe(driver, name)


def login_token(demo, uid):
    """A token for `uid` from POST /v1/login, as any client gets one."""
    request = urllib.request.Request(
        f"{demo.base}/v1/login",
        data=json.dumps({"user_id": uid}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())["token"]


def handshake_status(port, target, origin=None):
    """The HTTP status a WebSocket handshake for `target` gets (101 when accepted)."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n" not in head:
            data = sock.recv(4096)
            assert data, "the gateway closed without answering the handshake"
            head += data
    return int(head.split(b" ", 2)[1])


def ws_url(demo, **query):
    return f"ws://127.0.0.1:{demo.port}/ws?{urllib.parse.urlencode(query)}"


def test_a_page_cannot_read_another_users_pushes(gateway, browser):
    alice = browser()
    bob = browser()
    log_in(alice, gateway, 11, "alice")
    log_in(bob, gateway, 12, "bob")
    own_token = alice.execute_script("return token")
    assert own_token

    # Alice's page asks for bob's session: its own token with `uid=12` (the
    # query's uid is not where the session's user comes from any more), and no
    # token at all.
    alice.execute_script(PROBE, "as_bob", ws_url(gateway, access_token=own_token, uid=12, did="x"))
    alice.execute_script(PROBE, "no_token", ws_url(gateway, uid=12, did="y"))
    as_bob = wait_probe(alice, "as_bob", lambda r: r["messages"], "answers its first request")
    # The session is alice's: her token's, whatever the query says.
    assert as_bob["opened"]
    assert as_bob["messages"][0]["seq"] == 1
    no_token = wait_probe(alice, "no_token", lambda r: r["closed"] is not None, "is refused")
    assert (no_token["opened"], no_token["closed"], no_token["messages"]) == (False, 1006, [])
    assert handshake_status(gateway.port, "/ws?uid=12&did=y") == 401

    send(alice, 12, "for bob only")
    incoming(bob, "for bob only")
    send(bob, 11, "for alice")
    incoming(alice, "for alice")
    # The probe of the `uid=12` query is a session of user 11: it gets the push
    # to 11, which was sent after the one to 12, and never the push to 12.
    as_bob = wait_probe(
        alice, "as_bob", lambda r: any(m.get("push") for m in r["messages"]), "gets a push"
    )
    pushes = [m["body"] for m in as_bob["messages"] if m.get("push")]
    assert [(p["to_uid"], p["text"]) for p in pushes] == [(11, "for alice")]
    assert probe(alice, "no_token")["messages"] == []


def test_a_page_of_another_origin_cannot_open_a_session(gateway, browser, tmp_path):
    # Bob's token in the hands of a page of another origin (the same host, another
    # port: another origin to a browser), served by a second local HTTP server.
    stolen = login_token(gateway, 12)
    page = tmp_path / "elsewhere" / "index.html"
    page.parent.mkdir()
    page.write_text("<!doctype html><title>elsewhere</title><p>another site</p>\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=page.parent)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        origin = f"http://127.0.0.1:{server.server_address[1]}"
        elsewhere = browser()
        elsewhere.get(f"{origin}/index.html")
        assert elsewhere.title == "elsewhere"
        elsewhere.execute_script(PROBE, "stolen", ws_url(gateway, access_token=stolen, did="z"))
        refused = wait_probe(elsewhere, "stolen", lambda r: r["closed"] is not None, "is refused")
        assert (refused["opened"], refused["closed"], refused["messages"]) == (False, 1006, [])
        # What the browser does not show the page: the gateway answered 403 for
        # that Origin; the same token from the demo's own origin is accepted.
        target = f"/ws?access_token={stolen}&did=z"
        assert handshake_status(gateway.port, target, origin=origin) == 403
        assert handshake_status(gateway.port, target, origin=gateway.base) == 101
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)

    # And in a browser, on the demo's own origin, the same token opens a session.
    demo = browser()
    demo.get(f"{gateway.base}/demo/")
    demo.execute_script(PROBE, "own_origin", ws_url(gateway, access_token=stolen, did="z"))
    accepted = wait_probe(demo, "own_origin", lambda r: r["messages"], "answers")
    assert accepted["opened"]


# ---------------------------------------------------------------- CORS

# fetch() from the page it runs in; reports the status, the JSON body and the
# X-Request-Id the page can read, or the error when the browser blocks it.
FETCH = """
const [url, options, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
fetch(url, options).then(
    async (answer) => done({
        status: answer.status,
        body: await answer.json(),
        requestId: answer.headers.get("X-Request-Id"),
    }),
    (error) => done({error: String(error)}),
);
"""


@contextlib.contextmanager
def page_server(directory, port):
    """A second local web server (another origin to a browser) serving one page."""
    directory.mkdir()
    (directory / "index.html").write_text("<!doctype html><title>partner</title><p>hi</p>\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


def test_a_listed_origin_calls_rest_routes_and_another_cannot(gateway, browser, tmp_path):
    token = login_token(gateway, 21)
    with page_server(tmp_path / "partner", gateway.partner_port) as partner:
        page = browser()
        page.get(f"{partner}/index.html")
        profile = page.execute_async_script(FETCH, f"{gateway.base}/v1/users/3/profile", {})
        assert profile["status"] == 200, profile
        assert profile["body"]["user_id"] == 3
        assert profile["requestId"]  # exposed to the page
        # JSON and a bearer token: a preflighted call, answered before routing.
        sent = page.execute_async_script(
            FETCH,
            f"{gateway.base}/v1/messages",
            {
                "method": "POST",
                "headers": {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
                "body": json.dumps({"to_uid": 22, "text": "from the partner's page"}),
            },
        )
        assert sent["status"] == 200, sent
        assert sent["body"]["msg_id"]
    with page_server(tmp_path / "stranger", 0) as stranger:
        other = browser()
        other.get(f"{stranger}/index.html")
        blocked = other.execute_async_script(FETCH, f"{gateway.base}/v1/users/3/profile", {})
        assert "error" in blocked, blocked  # the browser hides the answer from the page
