"""The web IM demo in a real browser: two users chat through the real gateway.

Headless Debian Chromium, driven by selenium through Debian's chromedriver
(`make test` installs both), loads /demo/ from a real `tlvproxy serve` in front
of a real `tlvproxy mock-upstream`, both started as processes on free ports.
A screenshot of each page lands in build/test-output/.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

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


def write_table(directory):
    """The demo table with free ports and an absolute proto path."""
    table = yaml.safe_load((REPO / "commands.yaml").read_text())
    ports = {"http": free_port(), "admin": free_port(), "upstream": free_port()}
    table["listen"] = {
        "http": f"127.0.0.1:{ports['http']}",
        "admin": f"127.0.0.1:{ports['admin']}",
    }
    table["upstreams"]["im"]["nodes"] = [f"127.0.0.1:{ports['upstream']}"]
    table["proto"]["paths"] = [str(REPO / "proto")]
    assert table["demo"] is True
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
    """The real mock upstream and gateway on the demo table; yields the HTTP base URL."""
    directory = tmp_path_factory.mktemp("demo")
    table, ports = write_table(directory)
    logs = [directory / "upstream.log", directory / "gateway.log"]
    with logs[0].open("w") as upstream_log, logs[1].open("w") as gateway_log:
        upstream = start(
            ["mock-upstream", "--listen", f"127.0.0.1:{ports['upstream']}", "-c", str(table)],
            upstream_log,
        )
        gateway = start(["serve", "-c", str(table)], gateway_log)
        processes = [upstream, gateway]
        try:
            wait_ready(f"http://127.0.0.1:{ports['admin']}/readyz", processes, logs)
            yield f"http://127.0.0.1:{ports['http']}"
        finally:
            for process in reversed(processes):
                process.terminate()
            for process in reversed(processes):
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


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


def log_in(driver, base, uid, did):
    driver.get(f"{base}/demo/?uid={uid}&did={did}")
    assert driver.title == "tlvproxy IM demo"
    assert driver.find_element(By.ID, "uid").get_attribute("value") == str(uid)
    driver.find_element(By.ID, "connect").click()
    wait = WebDriverWait(driver, WAIT)
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "online")
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


def test_two_users_chat_through_the_gateway(gateway, browser):
    alice = browser()
    bob = browser()
    log_in(alice, gateway, 1, "alice-laptop")
    log_in(bob, gateway, 2, "bob-phone")

    greeting = "hello bob <b>not bold</b> \u2713"
    send(alice, 2, greeting)
    pushed = incoming(bob, greeting)
    assert pushed.find_element(By.CLASS_NAME, "meta").text.startswith("from 1 to 2")
    assert pushed.find_elements(By.TAG_NAME, "b") == []  # text, never markup
    # The sender's item carries the msg_id of the send_message response: the same
    # message id the recipient's push carries.
    outgoing = sent(alice, greeting)
    assert outgoing.get_attribute("data-msg-id") == pushed.get_attribute("data-msg-id")

    send(bob, 1, "hi alice")
    answer = incoming(alice, "hi alice")
    assert answer.find_element(By.CLASS_NAME, "meta").text.startswith("from 2 to 1")
    # Alice's own message never came back to her as a push.
    assert [
        item.find_element(By.CLASS_NAME, "text").text
        for item in alice.find_elements(By.CSS_SELECTOR, "#messages li.incoming")
    ] == ["hi alice"]

    # The protocol log shows the json-mode frames of SPEC 5.
    frames = [json.loads(item.text) for item in bob.find_elements(By.CSS_SELECTOR, "#log li.in")]
    push = next(frame for frame in frames if frame.get("push"))
    assert push["cmd"] == "new_message"
    assert push["body"]["text"] == greeting
    assert push["body"]["from_uid"] == 1

    OUTPUT.mkdir(parents=True, exist_ok=True)
    assert bob.save_screenshot(str(OUTPUT / "demo-chat.png"))
    assert alice.save_screenshot(str(OUTPUT / "demo-chat-sender.png"))
    assert (OUTPUT / "demo-chat.png").stat().st_size > 0


def test_get_profile_and_disconnect(gateway, browser):
    page = browser()
    log_in(page, gateway, 7, "tablet")
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
    assert "close code 1000" in status.text
    assert page.find_element(By.ID, "send").get_attribute("disabled") is not None
