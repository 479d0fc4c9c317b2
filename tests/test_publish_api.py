"""The publish API on a real relay's metrics listener: with and without the
key, text and binary bodies, too large, wrong methods, unknown rooms, room
counts and paging; the members receive what is published through the
reference `websockets` client.

Requests go over raw sockets (http.client would add its own headers and
retries); each is bounded by the socket timeout.
"""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.parse

import pytest
from websockets.sync.client import connect

from relay_process import METRICS_ON, merged

KEY = "publish-api-key-0123456789abcdef"
MAX_MESSAGE = 4096
STEP = 10.0


@pytest.fixture(scope="module")
def relay(module_relay_factory):
    return module_relay_factory(
        merged(
            METRICS_ON,
            {"api": {"enabled": True, "key": KEY}, "relay": {"max_message_size": MAX_MESSAGE}},
        ),
        name="api",
    )


def http(relay, method, path, body=b"", headers=None, key=KEY):
    """(status, headers, body) of one request to the metrics listener."""
    url = urllib.parse.urlsplit(relay.metrics_url)
    fields = (
        {"Host": url.netloc, "Content-Length": str(len(body))}
        if body or method == "POST"
        else {"Host": url.netloc}
    )
    if key is not None:
        fields["Authorization"] = f"Bearer {key}"
    fields.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    with socket.create_connection((url.hostname, url.port), timeout=STEP) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head_bytes, _, payload = response.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    header_map = {}
    for line in lines:
        name, _, value = line.partition(":")
        header_map[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), header_map, payload


def api_json(relay, method, path, body=b"", headers=None, key=KEY):
    status, fields, payload = http(relay, method, path, body, headers, key)
    assert fields["content-type"] == "application/json", (status, payload)
    return status, json.loads(payload)


def member(relay, room):
    return connect(relay.ws(room), open_timeout=STEP, close_timeout=STEP)


def test_text_and_binary_reach_every_member_of_the_room(relay):
    with member(relay, "/news") as a, member(relay, "/news") as b, member(relay, "/other") as c:
        status, answer = api_json(
            relay,
            "POST",
            "/publish/news",
            "héllo".encode(),
            {"Content-Type": "text/plain; charset=utf-8"},
        )
        assert (status, answer) == (200, {"room": "/news", "delivered": 2})
        assert a.recv(timeout=STEP) == "héllo" and b.recv(timeout=STEP) == "héllo"
        status, answer = api_json(
            relay,
            "POST",
            "/publish/news",
            b"\x00\xff",
            {"Content-Type": "application/octet-stream"},
        )
        assert answer["delivered"] == 2
        assert a.recv(timeout=STEP) == b"\x00\xff" and b.recv(timeout=STEP) == b"\x00\xff"
        # No Content-Type: binary. JSON: text.
        api_json(relay, "POST", "/publish/news", b"raw")
        assert a.recv(timeout=STEP) == b"raw"
        api_json(relay, "POST", "/publish/news", b'{"a":1}', {"Content-Type": "application/json"})
        assert a.recv(timeout=STEP) == '{"a":1}'
        # An empty message is a message.
        api_json(relay, "POST", "/publish/news", b"", {"Content-Type": "text/plain"})
        assert a.recv(timeout=STEP) == ""
        # The other room heard none of it: its own echo comes first.
        c.send("mine")
        assert c.recv(timeout=STEP) == "mine"


def test_nested_and_encoded_room_names(relay):
    with member(relay, "/team/a%20b") as ws:
        for path in ("/publish/team/a%20b", "/publish/team%2Fa%20b"):
            status, answer = api_json(relay, "POST", path, b"x", {"Content-Type": "text/plain"})
            assert (status, answer) == (200, {"room": "/team/a b", "delivered": 1})
            assert ws.recv(timeout=STEP) == "x"


def test_unknown_room_delivers_to_nobody(relay):
    assert api_json(relay, "POST", "/publish/nobody-here", b"x") == (
        200,
        {"room": "/nobody-here", "delivered": 0},
    )


@pytest.mark.parametrize(
    "key",
    [None, "", "wrong-key-0123456789abcdef", KEY + "x", KEY[:-1]],
    ids=["none", "empty", "wrong", "longer", "shorter"],
)
def test_without_the_key_401(relay, key):
    for method, path in (("POST", "/publish/news"), ("GET", "/rooms"), ("GET", "/rooms/news")):
        status, fields, payload = http(
            relay, method, path, b"x" if method == "POST" else b"", key=key
        )
        assert status == 401, (method, path)
        assert fields["www-authenticate"] == 'Bearer realm="fastrelay-api"'


def test_other_schemes_are_not_the_key(relay):
    status, _, _ = http(relay, "GET", "/rooms", headers={"Authorization": f"Basic {KEY}"}, key=None)
    assert status == 401


def test_too_large_413_without_reading_the_body(relay):
    with member(relay, "/big") as ws:
        status, answer = api_json(relay, "POST", "/publish/big", b"x" * MAX_MESSAGE)
        assert (status, answer["delivered"]) == (200, 1)
        assert ws.recv(timeout=STEP) == b"x" * MAX_MESSAGE
        # Over the limit: refused from the Content-Length alone.
        status, fields, payload = http(
            relay, "POST", "/publish/big", headers={"Content-Length": str(MAX_MESSAGE + 1)}
        )
        assert status == 413
        ws.send("barrier")
        assert ws.recv(timeout=STEP) == "barrier"  # nothing was delivered before it


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("GET", "/publish/news", "POST"),
        ("PUT", "/publish/news", "POST"),
        ("POST", "/rooms", "GET, HEAD"),
        ("DELETE", "/rooms/news", "GET, HEAD"),
    ],
)
def test_wrong_method_405(relay, method, path, allow):
    status, fields, _ = http(relay, method, path)
    assert (status, fields["allow"]) == (405, allow)


@pytest.mark.parametrize(
    "headers, body, status",
    [
        ({"Content-Type": "text/plain"}, b"\xff\xfe", 400),  # a text frame must be UTF-8
        ({"Content-Type": "text/plain; charset=iso-8859-1"}, b"caf\xe9", 415),
        ({"Content-Length": "12x"}, b"", 400),
        ({"Transfer-Encoding": "chunked"}, b"", 411),
    ],
)
def test_bodies_refused(relay, headers, body, status):
    assert http(relay, "POST", "/publish/news", body, headers)[0] == status


def test_post_without_content_length_411(relay):
    url = urllib.parse.urlsplit(relay.metrics_url)
    with socket.create_connection((url.hostname, url.port), timeout=STEP) as sock:
        sock.sendall(
            f"POST /publish/news HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {KEY}\r\n\r\n".encode()
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 411 ")


def test_expect_100_continue(relay):
    url = urllib.parse.urlsplit(relay.metrics_url)
    with (
        member(relay, "/cont") as ws,
        socket.create_connection((url.hostname, url.port), timeout=STEP) as sock,
    ):
        sock.sendall(
            f"POST /publish/cont HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += sock.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"later")
        final = b""
        while chunk := sock.recv(65536):
            final += chunk
        assert final.startswith(b"HTTP/1.1 200 OK\r\n")
        assert ws.recv(timeout=STEP) == b"later"


def test_rooms_with_their_member_counts_and_paging(relay):
    names = [f"/count/{i:02d}" for i in range(5)]
    with contextlib.ExitStack() as stack:
        for i, name in enumerate(names):
            for _ in range(i + 1):
                stack.enter_context(member(relay, name))
        status, one = api_json(relay, "GET", "/rooms/count/03")
        assert (status, one) == (200, {"room": "/count/03", "members": 4})
        assert api_json(relay, "GET", "/rooms/count/nope") == (404, {"error": "no such room"})

        status, listing = api_json(relay, "GET", "/rooms?limit=1000")
        counted = {
            r["room"]: r["members"] for r in listing["rooms"] if r["room"].startswith("/count/")
        }
        assert counted == {name: i + 1 for i, name in enumerate(names)}
        assert listing["next"] is None and listing["total"] == len(listing["rooms"])
        assert [r["room"] for r in listing["rooms"]] == sorted(r["room"] for r in listing["rooms"])

        # Paging: two at a time from just before the first, following `next`.
        seen, after = [], "/count/"
        while True:
            query = urllib.parse.urlencode({"limit": 2, "after": after})
            page = api_json(relay, "GET", f"/rooms?{query}")[1]
            seen += [r["room"] for r in page["rooms"] if r["room"].startswith("/count/")]
            if page["next"] is None:
                break
            assert len(page["rooms"]) == 2
            after = page["next"]
        assert seen == names

        status, fields, payload = http(relay, "HEAD", "/rooms/count/00")
        assert (status, payload) == (200, b"") and int(fields["content-length"]) > 0
    # Rooms vanish with their last member (the relay has seen the closes once
    # each client's close handshake has completed, which close() waits for).
    assert api_json(relay, "GET", "/rooms/count/00")[0] == 404


@pytest.mark.parametrize("limit", ["0", "1001", "x", "-1"])
def test_bad_limit_400(relay, limit):
    assert api_json(relay, "GET", f"/rooms?limit={limit}")[0] == 400


def test_metrics_paths_still_work_and_need_no_key(relay):
    assert http(relay, "GET", "/metrics", key=None)[0] == 200
    assert http(relay, "GET", "/healthz", key=None)[0] == 200
    assert http(relay, "POST", "/metrics", key=None)[0] == 405


def test_api_off_by_default(relay_factory):
    relay = relay_factory(METRICS_ON)
    assert http(relay, "POST", "/publish/news", b"x")[0] == 405  # a metrics-only listener
    assert http(relay, "GET", "/rooms")[0] == 404
