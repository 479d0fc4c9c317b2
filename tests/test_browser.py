"""The browser demo (example/index.html) in real headless Chromium against a
real fastrelay process.

Needs Debian's chromium at /usr/bin/chromium and the playwright python
package (driver only, no browser download): `.ci/install-browser.sh` installs
both. Without them these tests fail (never skip), so that a green run cannot
hide a missing browser.

The relays are started by tests/relay_process.py (FASTRELAY_CMD there runs
the page against another build).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import jwt
import pytest

from relay_process import METRICS_ON, merged
from scrape import scrape

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OPEN_MS = 10_000  # page reaches "open"
SEE_MS = 10_000  # a message shows up in a page
RECONNECT_MS = 45_000  # page is back after a server restart (backoff with jitter)

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

try:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=SEE_MS)
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None


def _missing_browser(reason: str):
    pytest.fail(f"{reason}: run .ci/install-browser.sh before the tests", pytrace=False)


# --------------------------------------------------------------------------
# a real fastrelay process (relay_process.py) serving the demo page

DEMO = {"relay": {"serve_demo": True}}


def page_url(relay) -> str:
    return f"http://127.0.0.1:{relay.port}/"


# --------------------------------------------------------------------------
# the browser


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        _missing_browser("the playwright python package is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        _missing_browser(f"{CHROMIUM} is missing")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def open_page(browser):
    """open_page(url) -> a page in its own context (its own 'tab' and storage).

    Uncaught page errors fail the test at teardown."""
    contexts = []
    errors: list[str] = []

    def open_(url: str):
        ctx = browser.new_context(viewport={"width": 900, "height": 720})
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(SEE_MS)
        page.on("pageerror", lambda exc: errors.append(f"{url}: {exc}"))
        page.goto(url)
        return page

    yield open_
    for ctx in contexts:
        ctx.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def join(page, room: str, nick: str):
    page.fill("#room", room)
    page.fill("#nick", nick)
    page.click("#connect")
    expect(page.locator("#state")).to_have_attribute("data-state", "open", timeout=OPEN_MS)
    expect(page.locator("#state")).to_have_text("open")


def say(page, text: str):
    page.fill("#text", text)
    page.press("#text", "Enter")
    expect(page.locator("#text")).to_have_value("")


def chat(page, token: str):
    """The chat entries of `page` whose text contains `token`."""
    return page.locator("#messages li.chat").filter(has_text=token)


def sees(page, token: str, nick: str | None = None, text: str | None = None):
    entry = chat(page, token)
    expect(entry).to_have_count(1, timeout=SEE_MS)
    if nick is not None:
        expect(entry.locator(".nick")).to_have_text(nick)
    if text is not None:
        assert entry.locator(".text").text_content() == text


# --------------------------------------------------------------------------
# tests


@pytest.mark.timeout(120)
def test_two_tabs_chat_rooms_injection_and_restart(relay_factory, open_page):
    relay = relay_factory(DEMO)
    port = relay.port

    alice = open_page(page_url(relay))
    bob = open_page(page_url(relay))
    carol = open_page(page_url(relay))
    # Served by the relay, the page points at the relay itself.
    expect(alice.locator("#url")).to_have_value(f"ws://127.0.0.1:{port}/")
    expect(alice.locator("#state")).to_have_attribute("data-state", "closed")

    join(alice, "/lobby", "alice")
    join(bob, "/lobby", "bob")
    join(carol, "/elsewhere", "carol")

    # Two tabs in the same room see each other (and themselves).
    say(alice, "hello from alice #a1")
    say(bob, "hi alice, bob here #b1")
    for page in (alice, bob):
        sees(page, "#a1", nick="alice", text="hello from alice #a1")
        sees(page, "#b1", nick="bob", text="hi alice, bob here #b1")

    # Another room hears nothing of it, and the lobby nothing of it.  Each
    # side's own echo is the barrier: the relay writes a member's frames in
    # order, so anything misrouted would have arrived before it.
    say(carol, "anyone here? #c1")
    sees(carol, "#c1", nick="carol")
    expect(carol.locator("#messages li.chat")).to_have_count(1)
    say(alice, "still in the lobby #a2")
    sees(bob, "#a2")
    sees(alice, "#a2")
    for page in (alice, bob):
        expect(chat(page, "#c1")).to_have_count(0)
    expect(chat(carol, "#a2")).to_have_count(0)

    # HTML from other users is shown as text, never parsed.
    payload = '<img src=x onerror="window.__pwned=1"> <b>bold?</b> #x1'
    say(bob, payload)
    for page in (alice, bob):
        sees(page, "#x1", nick="bob", text=payload)
        assert page.locator("#messages img, #messages b").count() == 0
    for page in (alice, bob, carol):
        assert page.evaluate("typeof window.__pwned") == "undefined"

    # The server goes away: the pages say so and retry with backoff.
    code = relay.stop()
    assert code == 0, f"fastrelay exited {code} on SIGTERM\n{relay.output()}"
    for page in (alice, bob, carol):
        expect(page.locator("#state")).to_have_attribute(
            "data-state", "reconnecting", timeout=SEE_MS
        )
        expect(page.locator("#state")).to_have_text(re.compile(r"^reconnecting in \d+s$"))
        expect(page.locator("#messages li.system").filter(has_text="disconnected (")).to_have_count(
            1
        )
        expect(page.locator("#send")).to_be_disabled()

    # A new server on the same port: the pages rejoin their rooms by themselves.
    relay2 = relay_factory(merged(DEMO, {"server": {"port": port}}))
    assert relay2.port == port
    for page in (alice, bob, carol):
        expect(page.locator("#state")).to_have_attribute("data-state", "open", timeout=RECONNECT_MS)
        expect(
            page.locator("#messages li.system").filter(has_text="reconnected to ")
        ).to_have_count(1)

    say(bob, "back again #b2")
    say(alice, "welcome back #a3")
    for page in (alice, bob):
        sees(page, "#b2", nick="bob")
        sees(page, "#a3", nick="alice")
    say(carol, "me too #c2")
    sees(carol, "#c2")
    for page in (alice, bob):
        expect(chat(page, "#c2")).to_have_count(0)
    expect(chat(carol, "#a3")).to_have_count(0)
    expect(chat(carol, "#b2")).to_have_count(0)

    ARTIFACTS.mkdir(exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "browser-chat.png"))

    assert relay2.stop() == 0, relay2.output()


@pytest.mark.timeout(120)
def test_page_shows_foreign_frames_and_sends_the_documented_shape(relay_factory, open_page):
    from websockets.sync.client import connect

    relay = relay_factory(DEMO)
    page = open_page(page_url(relay))
    join(page, "/odd", "dora")

    with connect(relay.url + "odd", open_timeout=10, close_timeout=5) as peer:
        peer.send("plain words, not JSON #t1")
        peer.send('{"foo": 1, "tag": "#t2"}')
        peer.send('["#t3", 2]')
        peer.send('{"nick": 5, "text": "wrong nick type #t4"}')
        peer.send(b"\x00\x01\x02\xff binary!")  # 12 bytes
        peer.send(
            json.dumps(
                {
                    "nick": "<i>mallory</i>",
                    "text": "<script>window.__pwned=2</script> #t5",
                    "ts": 1_700_000_000_000,
                }
            )
        )
        peer.send(json.dumps({"text": "no nick, no ts #t6"}))

        raw = page.locator("#messages li.raw")
        expect(raw.filter(has_text="#t1")).to_contain_text("[text]")
        expect(raw.filter(has_text="#t2")).to_contain_text("[json]")
        expect(raw.filter(has_text="#t3")).to_have_count(1)
        expect(raw.filter(has_text="#t4")).to_have_count(1)
        expect(raw.filter(has_text="[binary 12 bytes]")).to_have_count(1)
        sees(page, "#t5", nick="<i>mallory</i>", text="<script>window.__pwned=2</script> #t5")
        sees(page, "#t6", nick="anonymous", text="no nick, no ts #t6")
        assert page.locator("#messages i, #messages script").count() == 0
        assert page.evaluate("typeof window.__pwned") == "undefined"

        # The page still works, and what it sends is the documented frame:
        # one JSON text frame {"nick", "text", "ts": <ms epoch>}.
        before = time.time() * 1000
        say(page, "all fine #t7")
        sees(page, "#t7", nick="dora")
        deadline = time.monotonic() + 10
        frame = None
        while time.monotonic() < deadline:
            msg = peer.recv(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(msg, str) and "#t7" in msg:
                frame = msg
                break
        assert frame is not None, "the page's message did not reach the other client"
        data = json.loads(frame)
        assert set(data) == {"nick", "text", "ts"}
        assert data["nick"] == "dora" and data["text"] == "all fine #t7"
        assert (
            isinstance(data["ts"], int)
            and before - 5_000 <= data["ts"] <= time.time() * 1000 + 5_000
        )

    expect(page.locator("#state")).to_have_attribute("data-state", "open")
    assert relay.stop() == 0, relay.output()


@pytest.mark.timeout(60)
def test_relay_serves_the_page_on_any_path(relay_factory, open_page):
    relay = relay_factory(DEMO)
    page = open_page(page_url(relay))
    # goto() returned: check what came back for another path too.
    response = page.goto(page_url(relay) + "team-room?x=1")
    assert response is not None and response.status == 200
    assert response.headers.get("content-type", "").startswith("text/html")
    expect(page.locator("#url")).to_have_value(relay.url)
    # Opened on a path, the page offers that path as the room.
    expect(page.locator("#room")).to_have_value("/team-room")
    page.click("#connect")
    expect(page.locator("#state")).to_have_attribute("data-state", "open", timeout=OPEN_MS)
    # The user leaves: closed, and no reconnecting.
    page.click("#connect")
    expect(page.locator("#state")).to_have_attribute("data-state", "closed")
    expect(page.locator("#state")).to_have_text("closed")
    assert relay.stop() == 0, relay.output()


# --------------------------------------------------------------------------
# access control: the page with a token


AUTH_SECRET = "browser-test-secret-0123456789-abcdefgh"
AUTH_DEMO = merged(merged(DEMO, METRICS_ON), {"auth": {"enabled": True, "secret": AUTH_SECRET}})


def token_for(rooms, publish=True, ttl=600):
    claims = {"rooms": rooms, "publish": publish, "exp": int(time.time()) + ttl}
    return jwt.encode(claims, AUTH_SECRET, algorithm="HS256")


def refusals(relay, reason: str) -> float:
    return scrape(relay.metrics_url).get(
        f'websocket_handshake_failures_total{{reason="{reason}"}}', 0
    )


@pytest.mark.timeout(120)
def test_page_with_a_token_joins_and_explains_refusals(relay_factory, open_page):
    relay = relay_factory(AUTH_DEMO)

    # ?token= in the page's own address: it fills the field and leaves the address.
    alice = open_page(page_url(relay) + "?room=/lobby&token=" + token_for(["/lobby"]))
    expect(alice.locator("#token")).to_have_value(re.compile(r"^ey"))
    assert "token" not in alice.evaluate("location.search")
    join(alice, "/lobby", "alice")

    # The token field: a read-only member sees the room but may not speak.
    bob = open_page(page_url(relay))
    bob.fill("#token", token_for(["/lobby"], publish=False))
    join(bob, "/lobby", "bob")
    expect(bob.locator("#messages li.system").filter(has_text="read-only")).to_have_count(1)
    expect(bob.locator("#text")).to_be_disabled()
    expect(bob.locator("#send")).to_be_disabled()
    say(alice, "tokens work #k1")
    sees(alice, "#k1", nick="alice")
    sees(bob, "#k1", nick="alice")

    # A token for another room: the relay answers 403 (counted), the page says why
    # and stops retrying.
    carol = open_page(page_url(relay))
    carol.fill("#token", token_for(["/lobby"]))
    carol.fill("#room", "/elsewhere")
    carol.click("#connect")
    refused = carol.locator("#messages li.refused")
    expect(refused).to_have_text(
        "refused: your token does not allow room /elsewhere (it allows /lobby)."
    )
    expect(carol.locator("#state")).to_have_text("refused")
    expect(carol.locator("#state")).to_have_attribute("data-state", "closed")
    assert refusals(relay, "forbidden_room") == 1

    # An expired token: 401, and the page names the expiry.
    dave = open_page(page_url(relay))
    dave.fill("#token", token_for(["/lobby"], ttl=-120))
    dave.click("#connect")
    expect(dave.locator("#messages li.refused")).to_contain_text("refused: your token expired at")
    assert refusals(relay, "unauthorized") == 1

    # No token at all: 401, and the page says a token is needed (and keeps retrying,
    # since it cannot tell a refusal from a relay that is down).
    erin = open_page(page_url(relay))
    erin.click("#connect")
    expect(erin.locator("#messages li.refused")).to_contain_text(
        "A relay with access control needs a token allowing this room"
    )
    expect(erin.locator("#state")).to_have_attribute("data-state", "reconnecting")
    erin.click("#connect")  # leave
    assert refusals(relay, "unauthorized") >= 2

    ARTIFACTS.mkdir(exist_ok=True)
    carol.screenshot(path=str(ARTIFACTS / "browser-token-refused.png"))
    assert relay.stop() == 0, relay.output()
