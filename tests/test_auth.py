"""Access control against real relay processes: the token matrix (one relay
per key kind), read-only members, expiry, the counts in /metrics, and what
reaches the logs.

Refusals are read on a raw socket, to check the status line, the
WWW-Authenticate header and the body the relay writes; accepted tokens are
used with the reference `websockets` client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from relay_process import METRICS_ON, merged
from scrape import scrape
from wsraw import RawClient, handshake_request

SECRET = "tests-secret-0123456789-abcdefghijklmnop"  # 39 bytes: enough for HS256
OTHER_SECRET = "another-secret-0123456789-abcdefghijklm"
AUDIENCE = "fastrelay-tests"
ISSUER = "https://issuer.test"
STEP = 10.0  # every receive is bounded by this


def claims(rooms=("/lobby",), ttl=600, **extra):
    now = int(time.time())
    out = {"rooms": list(rooms), "publish": True, "aud": AUDIENCE, "iss": ISSUER}
    out["exp"] = now + ttl
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def hs256(payload, secret=SECRET):
    return jwt.encode(payload, secret, algorithm="HS256")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_hs256(payload, key: bytes) -> str:
    """An HS256 token whose HMAC key is `key` (e.g. a public key's PEM),
    built by hand: PyJWT refuses to sign with a PEM key, an attacker does not."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(payload).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def unsigned(payload) -> str:
    """`alg: none`: a header, a payload and an empty signature."""
    head = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{b64url(json.dumps(payload).encode())}."


def auth_config(**auth):
    base = {"enabled": True, "audience": AUDIENCE, "issuer": ISSUER}
    return merged(METRICS_ON, {"auth": {**base, **auth}, "logging": {"level": "debug"}})


def upgrade(relay, path, headers=""):
    """(status, head, body) of an upgrade request on a raw socket; after a
    101 the body is empty (the connection is then closed by the client)."""
    client = RawClient(relay.port, handshake=False)
    try:
        client.send(handshake_request(path, extra=headers))
        head = client.read_http_head()
        status = int(head.split(b" ", 2)[1])
        return status, head, b"" if status == 101 else client.buf + client.read_to_eof()
    finally:
        client.close()


def refused(relay, path, headers=""):
    status, head, body = upgrade(relay, path, headers)
    challenge = [
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"www-authenticate:")
    ]
    return status, body.decode().strip(), challenge


def join(relay, path, token=None, **kw):
    url = relay.ws(path) + (f"?token={token}" if token else "")
    return connect(url, open_timeout=STEP, close_timeout=STEP, **kw)


@pytest.fixture(scope="module")
def hs_relay(module_relay_factory):
    return module_relay_factory(auth_config(secret=SECRET), name="hs")


# --- the token matrix on an HS256 relay ---------------------------------------


def test_valid_token_joins_and_relays(hs_relay):
    token = hs256(claims(sub="alice"))
    with join(hs_relay, "/lobby", token) as a, join(hs_relay, "/lobby", token) as b:
        a.send("hello")
        assert a.recv(timeout=STEP) == "hello"
        assert b.recv(timeout=STEP) == "hello"


def test_token_in_the_authorization_header(hs_relay):
    headers = {"Authorization": f"Bearer {hs256(claims())}"}
    with join(hs_relay, "/lobby", additional_headers=headers) as ws:
        ws.send("via header")
        assert ws.recv(timeout=STEP) == "via header"


@pytest.mark.parametrize(
    "make_token, detail",
    [
        (lambda: hs256(claims(ttl=-60)), "token expired"),
        (lambda: hs256(claims(nbf=int(time.time()) + 600)), "token not yet valid"),
        (lambda: hs256(claims(), OTHER_SECRET), "bad token signature"),
        (lambda: unsigned(claims()), "token algorithm not allowed"),
        (
            lambda: jwt.encode(claims(), SECRET * 2, algorithm="HS512"),
            "token algorithm not allowed",
        ),
        (lambda: hs256(claims(aud="someone-else")), "token for another audience"),
        (lambda: hs256(claims(aud=None)), "token lacks the aud claim"),
        (lambda: hs256(claims(iss="https://evil.test")), "token from another issuer"),
        (
            lambda: hs256({k: v for k, v in claims().items() if k != "exp"}),
            "token lacks the exp claim",
        ),
        (lambda: "not.a.token", "malformed token"),
        (
            lambda: hs256({**claims(), "rooms": "/lobby"}),
            "rooms and publish claims must be lists of rooms",
        ),
        (lambda: hs256(claims(publish="yes")), "rooms and publish claims must be lists of rooms"),
    ],
    ids=[
        "expired",
        "not-yet-valid",
        "wrong-signature",
        "alg-none",
        "algorithm-not-configured",
        "wrong-audience",
        "no-audience",
        "wrong-issuer",
        "no-exp",
        "malformed",
        "rooms-not-a-list",
        "publish-not-bool-or-list",
    ],
)
def test_invalid_tokens_get_401(hs_relay, make_token, detail):
    status, body, challenge = refused(hs_relay, f"/lobby?token={make_token()}")
    assert (status, body) == (401, detail)
    assert challenge == [
        f'Bearer realm="fastrelay", error="invalid_token", error_description="{detail}"'
    ]


def test_no_token_gets_401_with_a_bare_challenge(hs_relay):
    assert refused(hs_relay, "/lobby") == (401, "token required", ['Bearer realm="fastrelay"'])
    # Another scheme is not a token either.
    assert refused(hs_relay, "/lobby", "Authorization: Basic dXNlcjpwYXNz\r\n")[0] == 401


def test_two_tokens_are_refused(hs_relay):
    token = hs256(claims())
    status, body, _ = refused(
        hs_relay, f"/lobby?token={token}", f"Authorization: Bearer {token}\r\n"
    )
    assert (status, body) == (401, "more than one token")


@pytest.mark.parametrize(
    "rooms, allowed, forbidden",
    [
        (["/lobby"], ["/lobby"], ["/lobby2", "/lobby/x", "/", "/Lobby"]),
        (["/team/*"], ["/team/a", "/team/a/b"], ["/team", "/team/", "/teamx/a", "/other"]),
        (["/a", "/b/*"], ["/a", "/b/1"], ["/b", "/c"]),
        (["*"], ["/", "/anything/at/all"], []),
        ([], [], ["/", "/lobby"]),
    ],
    ids=["exact", "prefix", "several", "star", "none"],
)
def test_rooms_claim(hs_relay, rooms, allowed, forbidden):
    token = hs256(claims(rooms=rooms))
    for room in allowed:
        assert upgrade(hs_relay, f"{room}?token={token}")[0] == 101, room
    for room in forbidden:
        status, body, challenge = refused(hs_relay, f"{room}?token={token}")
        assert (status, body) == (403, "token does not allow this room"), room
        assert challenge == [
            'Bearer realm="fastrelay", error="insufficient_scope", '
            'error_description="token does not allow this room"'
        ]


def read_only_close(ws):
    """Send from a member that may not, and return the close it gets."""
    ws.send("may I?")
    with pytest.raises(ConnectionClosedError) as closed:
        ws.recv(timeout=STEP)
    return closed.value.rcvd.code, closed.value.rcvd.reason


@pytest.mark.parametrize(
    "publish",
    [False, None, ["/elsewhere"], ["/other/*"]],
    ids=["false", "absent", "list", "prefix"],
)
def test_read_only_member_receives_and_is_closed_when_it_sends(hs_relay, publish):
    speaker = hs256(claims(rooms=["/ro"]))
    listener = hs256(claims(rooms=["/ro"], publish=publish))
    with join(hs_relay, "/ro", speaker) as a, join(hs_relay, "/ro", listener) as b:
        a.send("for everyone")
        assert b.recv(timeout=STEP) == "for everyone"
        assert read_only_close(b) == (1008, "read-only")
        # The room goes on for the others, and nothing of b's reached them.
        a.send("still here")
        assert a.recv(timeout=STEP) == "for everyone"
        assert a.recv(timeout=STEP) == "still here"


def test_publish_patterns_decide_per_room(hs_relay):
    token = hs256(claims(rooms=["/team/*"], publish=["/team/speak"]))
    with join(hs_relay, "/team/speak", token) as ws:
        ws.send("allowed")
        assert ws.recv(timeout=STEP) == "allowed"
    with join(hs_relay, "/team/listen", token) as ws:
        assert read_only_close(ws) == (1008, "read-only")


def test_refusals_are_counted_by_reason(module_relay_factory):
    relay = module_relay_factory(auth_config(secret=SECRET), name="counted")
    for _ in range(3):
        upgrade(relay, "/lobby")
    upgrade(relay, f"/lobby?token={hs256(claims(ttl=-60))}")
    for _ in range(2):
        upgrade(relay, f"/elsewhere?token={hs256(claims())}")
    assert upgrade(relay, f"/lobby?token={hs256(claims())}")[0] == 101
    metrics = scrape(relay.metrics_url)
    assert metrics['websocket_handshake_failures_total{reason="unauthorized"}'] == 4
    assert metrics['websocket_handshake_failures_total{reason="forbidden_room"}'] == 2
    assert metrics["websocket_connections_total"] == 1


# --- asymmetric keys: one relay per kind, and HS/RS confusion -----------------


def pem_public(private) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


KEYS = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "PS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": lambda: ed25519.Ed25519PrivateKey.generate(),
}


@pytest.fixture(scope="module", params=sorted(KEYS))
def keyed_relay(request, module_relay_factory, tmp_path_factory):
    algorithm = request.param
    private, stranger = KEYS[algorithm](), KEYS[algorithm]()
    key_file = tmp_path_factory.mktemp("keys") / "public.pem"
    key_file.write_bytes(pem_public(private))
    relay = module_relay_factory(
        auth_config(algorithms=[algorithm], public_key_file=str(key_file)), name=algorithm
    )
    return relay, algorithm, private, stranger


def test_asymmetric_token_joins(keyed_relay):
    relay, algorithm, private, _ = keyed_relay
    token = jwt.encode(claims(), private, algorithm=algorithm)
    with join(relay, "/lobby", token) as ws:
        ws.send(algorithm)
        assert ws.recv(timeout=STEP) == algorithm


def test_asymmetric_token_from_another_key_is_refused(keyed_relay):
    relay, algorithm, _, stranger = keyed_relay
    token = jwt.encode(claims(), stranger, algorithm=algorithm)
    assert refused(relay, f"/lobby?token={token}")[:2] == (401, "bad token signature")


def test_hs256_signed_with_the_public_key_is_refused(keyed_relay):
    # The classic confusion: the verifier's public key, which anyone may
    # have, used as an HMAC secret.
    relay, _, private, _ = keyed_relay
    token = forged_hs256(claims(), pem_public(private))
    assert refused(relay, f"/lobby?token={token}")[:2] == (401, "token algorithm not allowed")


def test_alg_none_is_refused_by_an_asymmetric_relay(keyed_relay):
    relay, *_ = keyed_relay
    assert refused(relay, f"/lobby?token={unsigned(claims())}")[:2] == (
        401,
        "token algorithm not allowed",
    )


# --- expiry of open connections -----------------------------------------------


def test_expired_token_closes_the_connection_only_when_enforced(relay_factory):
    enforcing = relay_factory(auth_config(secret=SECRET, enforce_expiry=True), name="enforcing")
    lenient = relay_factory(auth_config(secret=SECRET), name="lenient")
    # b's token expires two seconds before a's: when the enforcing relay
    # closes a, b's token has been expired for two seconds (four sweeps at
    # least), and the lenient relay, which checks on the upgrade only, still
    # has b open. The relays' own clocks order the events; no sleep.
    token_a, token_b = hs256(claims(ttl=4)), hs256(claims(ttl=2))
    with join(enforcing, "/lobby", token_a) as a, join(lenient, "/lobby", token_b) as b:
        with pytest.raises(ConnectionClosedError) as closed:
            a.recv(timeout=STEP)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "token expired")
        b.send("still open")
        assert b.recv(timeout=STEP) == "still open"
    # A new upgrade with the expired token is refused by both.
    for relay in (enforcing, lenient):
        assert refused(relay, f"/lobby?token={token_b}")[:2] == (401, "token expired")


# --- what reaches the logs ----------------------------------------------------


def test_tokens_and_secrets_never_reach_the_logs(relay_factory):
    api_key = "api-key-for-the-log-test-0123456789"
    relay = relay_factory(
        merged(auth_config(secret=SECRET), {"api": {"enabled": True, "key": api_key}})
    )
    good = hs256(claims(sub="alice-the-subject"))
    bad = [
        hs256(claims(ttl=-60)),
        hs256(claims(), OTHER_SECRET),
        unsigned(claims()),
        hs256(claims(rooms=["/x"])),
    ]
    with join(relay, "/lobby", good) as ws:
        ws.send("hi")
        assert ws.recv(timeout=STEP) == "hi"
    with pytest.raises(InvalidStatus):
        with join(relay, "/lobby", bad[0]):
            pass
    for token in bad:
        upgrade(relay, f"/lobby?token={token}")
        upgrade(relay, "/lobby", f"Authorization: Bearer {token}\r\n")
    api = relay.metrics_url.removesuffix("/metrics")
    for key, status in ((api_key, 200), (api_key + "x", 401)):
        post = urllib.request.Request(
            f"{api}/publish/lobby", b"hi", {"Authorization": f"Bearer {key}"}, method="POST"
        )
        try:
            with urllib.request.urlopen(post, timeout=STEP) as response:
                assert response.status == status
        except urllib.error.HTTPError as e:
            assert e.code == status
    assert relay.stop() == 0
    log = relay.stderr.text() + relay.stdout.text()
    assert "[DEBUG]" in log and "alice-the-subject" in log  # the sub may appear, at debug
    assert "refused: 401 token expired" in log
    for secret in (SECRET, api_key, OTHER_SECRET, good, *bad):
        assert secret not in log
    # Nor a piece of one: the signature part is the most sensitive.
    for token in (good, *bad):
        for part in token.split("."):
            if len(part) > 8:
                assert part not in log
