"""Access control without processes: where the token is found, how room
patterns match, what a Verifier grants, what the gate hands the compiled
connection, and the auth/api configuration keys with their one-line errors."""

from __future__ import annotations

import logging
import math
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from test_connection_sansio import REQUEST, ManualLoop, RecordingTransport, feed

from fastrelay import auth, handshake, upgrade
from fastrelay._frames import Connection, Hub, State
from fastrelay.config import Config, ConfigError, load_config
from fastrelay.upgrade import Gate, GateSettings

SECRET = b"unit-test-secret-0123456789-abcdefghij"


def token(ttl: int = 600, secret: bytes = SECRET, **claims: object) -> str:
    payload: dict[str, object] = {"rooms": ["/r"], "exp": int(time.time()) + ttl}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


# --- where the token comes from -------------------------------------------------


@pytest.mark.parametrize(
    "query, authorization, found",
    [
        ("token=abc", (), "abc"),
        ("room=x&token=abc&y=1", (), "abc"),
        ("token=a%2Eb", (), "a.b"),
        ("", ("Bearer abc",), "abc"),
        ("", ("bearer   abc  ",), "abc"),
        ("", ("BEARER abc",), "abc"),
        ("token=abc", ("Basic dXNlcjpwYXNz",), "abc"),
    ],
)
def test_find_token(query, authorization, found):
    assert auth.find_token(query, authorization) == found


@pytest.mark.parametrize(
    "query, authorization",
    [("", ()), ("token=", ()), ("tokens=abc", ()), ("", ("Bearer",)), ("", ("Basic abc",))],
)
def test_no_token(query, authorization):
    assert auth.find_token(query, authorization) is auth.NO_TOKEN


@pytest.mark.parametrize(
    "query, authorization",
    [("token=a&token=b", ()), ("token=a", ("Bearer a",)), ("", ("Bearer a", "Bearer b"))],
)
def test_two_tokens_are_a_denial(query, authorization):
    denial = auth.find_token(query, authorization)
    assert isinstance(denial, auth.Denial)
    assert (denial.reason, denial.detail) == ("unauthorized", "more than one token")


def test_the_parser_hands_over_query_and_authorization():
    request = (
        "GET ws://relay.example/room/a?x=1&token=t HTTP/1.1\r\nHost: relay.example\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Authorization: Bearer one\r\nauthorization: Bearer two\r\n\r\n"
    ).encode()
    accept = handshake.parse_request(request, 0, handshake.Limits())
    assert isinstance(accept, handshake.Accept)
    assert (accept.room, accept.query) == ("/room/a", "x=1&token=t")
    assert accept.authorization == ("Bearer one", "Bearer two")
    plain = handshake.parse_request(REQUEST.format(room="/r").encode(), 0, handshake.Limits())
    assert isinstance(plain, handshake.Accept)
    assert (plain.query, plain.authorization) == ("", ())


# --- room patterns ----------------------------------------------------------------


@pytest.mark.parametrize(
    "patterns, room, allowed",
    [
        (["/a"], "/a", True),
        (["/a"], "/a/", False),
        (["/a/*"], "/a/b", True),
        (["/a/*"], "/a/b/c", True),
        (["/a/*"], "/a/", False),
        (["/a/*"], "/a", False),
        (["/a/*"], "/ab/c", False),
        (["/*"], "/x", True),
        (["/*"], "/", False),
        (["*"], "/", True),
        (["/a*"], "/ab", False),  # only a trailing "/*" is a pattern
        (["/a*"], "/a*", True),
        ([], "/", False),
    ],
)
def test_room_matches(patterns, room, allowed):
    assert auth.room_matches(patterns, room) is allowed


# --- what a Verifier grants --------------------------------------------------------


def test_grant_carries_read_only_expiry_and_subject():
    verifier = auth.Verifier(SECRET, ["HS256"], leeway=5.0)
    exp = int(time.time()) + 600
    grant = verifier.check(
        jwt.encode({"rooms": ["/r"], "exp": exp, "publish": True, "sub": "x" * 100}, SECRET),
        "/r",
    )
    assert grant == auth.Grant(read_only=False, expires=exp + 5.0, subject="x" * 64)
    assert verifier.check(token(publish=False), "/r").read_only is True
    assert verifier.check(token(), "/r").read_only is True  # no publish claim: listen only


def test_leeway_admits_a_token_just_expired():
    just_expired = token(ttl=-5)
    assert isinstance(
        auth.Verifier(SECRET, ["HS256"], leeway=60).check(just_expired, "/r"), auth.Grant
    )
    denial = auth.Verifier(SECRET, ["HS256"]).check(just_expired, "/r")
    assert denial == auth.Denial("unauthorized", "token expired", "invalid_token")


@pytest.mark.parametrize(
    "exp, expires", [(10**400, math.inf), ("99999999999", 99999999999.0), (1e300, 1e300)]
)
def test_any_expiry_pyjwt_accepts_is_a_time(exp, expires):
    """An exp too large for a float (PyJWT compares int(exp)) is the end of
    time, not an OverflowError in the middle of an upgrade."""
    grant = auth.Verifier(SECRET, ["HS256"]).check(
        jwt.encode({"rooms": ["/r"], "exp": exp}, SECRET), "/r"
    )
    assert isinstance(grant, auth.Grant)
    assert grant.expires == expires


def test_a_not_before_far_in_the_past_is_remembered_as_past():
    verifier = auth.Verifier(SECRET, ["HS256"])
    ancient = jwt.encode({"rooms": ["/r"], "exp": int(time.time()) + 60, "nbf": -(10**400)}, SECRET)
    for _ in range(2):  # verified, then found in the memory
        assert isinstance(verifier.check(ancient, "/r"), auth.Grant)


class CountingVerifier(auth.Verifier):
    """A Verifier counting its full checks (signature and claims)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.full_checks = 0

    def _verify(self, token):
        self.full_checks += 1
        return super()._verify(token)


def test_a_verified_token_is_remembered_not_rechecked():
    verifier = CountingVerifier(SECRET, ["HS256"])
    shared = token(rooms=["/a", "/b"], publish=["/a"])
    assert verifier.check(shared, "/a") == verifier.check(shared, "/a")
    # The room and publish rights are still decided per request.
    assert verifier.check(shared, "/b").read_only is True
    assert verifier.check(shared, "/c") == auth.Denial(
        "forbidden_room", "token does not allow this room", "insufficient_scope"
    )
    assert verifier.full_checks == 1


def test_refused_tokens_are_not_remembered():
    verifier = CountingVerifier(SECRET, ["HS256"])
    forged = token(secret=b"another-secret-0123456789-0123456789")
    for _ in range(2):
        assert verifier.check(forged, "/r").detail == "bad token signature"
    assert verifier.full_checks == 2


def test_a_remembered_token_still_expires(monkeypatch):
    verifier = CountingVerifier(SECRET, ["HS256"], leeway=10.0)
    now = time.time()
    remembered = token(ttl=60)
    assert isinstance(verifier.check(remembered, "/r"), auth.Grant)
    exp = jwt.decode(remembered, options={"verify_signature": False})["exp"]
    # Within the leeway after exp it still opens (as PyJWT decides), past it not.
    monkeypatch.setattr(auth.time, "time", lambda: exp + 9.5)
    assert isinstance(verifier.check(remembered, "/r"), auth.Grant)
    monkeypatch.setattr(auth.time, "time", lambda: exp + 10.0)
    assert verifier.check(remembered, "/r").detail == "token expired"
    assert verifier.full_checks == 1
    # Forgotten once expired: the next sight is a full check again (and fails).
    monkeypatch.setattr(auth.time, "time", lambda: now)
    verifier.check(remembered, "/r")
    assert verifier.full_checks == 2


def test_a_remembered_token_is_checked_against_nbf(monkeypatch):
    verifier = CountingVerifier(SECRET, ["HS256"])
    nbf = int(time.time()) - 5
    remembered = token(nbf=nbf)
    assert isinstance(verifier.check(remembered, "/r"), auth.Grant)
    monkeypatch.setattr(auth.time, "time", lambda: nbf - 1.0)  # the clock stepped back
    assert verifier.check(remembered, "/r").detail == "token not yet valid"
    assert verifier.full_checks == 1


def test_the_memory_is_bounded_oldest_first():
    verifier = CountingVerifier(SECRET, ["HS256"])
    verifier.CACHE_SIZE = 3
    tokens = [token(sub=f"user-{i}") for i in range(4)]
    for t in tokens:
        verifier.check(t, "/r")
    assert verifier.full_checks == 4
    verifier.check(tokens[3], "/r")
    verifier.check(tokens[1], "/r")
    assert verifier.full_checks == 4  # still remembered
    verifier.check(tokens[0], "/r")
    assert verifier.full_checks == 5  # the oldest was forgotten


def test_denial_challenges():
    assert auth.NO_TOKEN.challenge() == 'Bearer realm="fastrelay"'
    assert auth.Denial("forbidden_room", "no", "insufficient_scope").challenge() == (
        'Bearer realm="fastrelay", error="insufficient_scope", error_description="no"'
    )


# --- the gate: a decision value carrying the grant ------------------------------------


def gate_with(verifier: auth.Verifier) -> tuple[Gate, Hub, ManualLoop]:
    loop = ManualLoop()
    settings = GateSettings(
        limits=handshake.Limits(), max_connections=0, demo_page=None, verifier=verifier
    )
    gate = Gate(settings, logging.getLogger("test"))
    hub = Hub(loop, gate, handshake_timeout=10.0, close_timeout=5.0, ping_interval=0.0)
    return gate, hub, loop


def upgrade_with(hub: Hub, loop: ManualLoop, target: str) -> tuple[Connection, bytes]:
    conn = Connection(hub)
    transport = RecordingTransport()
    conn.connection_made(transport)
    feed(conn, REQUEST.format(room=target).encode())
    loop.run_turn()
    return conn, transport.take()


@pytest.mark.parametrize("enforce", [True, False])
def test_the_gate_converts_exp_to_loop_time(monkeypatch, enforce):
    now = float(int(time.time()))
    exp = int(now) + 100
    gate, hub, loop = gate_with(
        auth.Verifier(SECRET, ["HS256"], leeway=2.0, enforce_expiry=enforce)
    )
    # The hub's clock is the loop's; the token's is Unix time. The hub last
    # swept at 1000.0 and the loop has moved on since: the gate reads the
    # loop's clock, so the deadline does not come a sweep interval early.
    gate.clock = loop.time
    loop.now += 0.4
    monkeypatch.setattr(upgrade.time, "time", lambda: now + 40.0)
    conn, out = upgrade_with(hub, loop, "/r?token=" + token(exp=exp, publish=True))
    assert out.startswith(b"HTTP/1.1 101 ")
    assert conn.state == State.OPEN and not conn.read_only
    assert hub.now == 1000.0
    assert conn.expires_at == (1000.4 + (exp + 2.0 - (now + 40.0)) if enforce else 0.0)


def test_the_gate_refuses_and_counts():
    gate, hub, loop = gate_with(auth.Verifier(SECRET, ["HS256"]))
    conn, out = upgrade_with(hub, loop, "/r")
    assert out.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b'\r\nWWW-Authenticate: Bearer realm="fastrelay"\r\n' in out
    assert conn.state == State.CLOSED
    _, out = upgrade_with(hub, loop, "/elsewhere?token=" + token())
    assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    _, out = upgrade_with(hub, loop, "/r?token=" + token(publish=False))
    assert out.startswith(b"HTTP/1.1 101 ")
    assert gate.failures == {"unauthorized": 1, "forbidden_room": 1}


# --- configuration ---------------------------------------------------------------------


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def pem(private) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_defaults_leave_access_control_off():
    defaults = Config()
    assert defaults.auth.enabled is False and defaults.api.enabled is False
    assert defaults.auth.algorithms == ("HS256",)
    assert (defaults.auth.leeway, defaults.auth.enforce_expiry) == (0.0, False)


def test_secret_sources(tmp_path, monkeypatch):
    secret_file = tmp_path / "secret.txt"
    secret_file.write_bytes(SECRET + b"\n")
    cfg = load_config(write(tmp_path, "auth: {enabled: true, secret_file: secret.txt}\n"))
    assert cfg.auth.secret_file == str(secret_file)  # relative to the config file
    assert auth.verification_key(cfg.auth) == SECRET  # the trailing newline dropped
    monkeypatch.setenv("RELAY_SECRET", SECRET.decode())
    cfg = load_config(write(tmp_path, "auth: {enabled: true, secret_env: RELAY_SECRET}\n"))
    assert auth.verification_key(cfg.auth) == SECRET


def test_public_keys_of_each_kind(tmp_path):
    for algorithm, private in (
        ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", ec.generate_private_key(ec.SECP256R1())),
        ("ES384", ec.generate_private_key(ec.SECP384R1())),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
    ):
        (tmp_path / "key.pem").write_bytes(pem(private))
        cfg = load_config(
            write(
                tmp_path,
                f"auth: {{enabled: true, algorithms: [{algorithm}], public_key_file: key.pem}}\n",
            )
        )
        signed = jwt.encode({"rooms": ["/r"], "exp": int(time.time()) + 60}, private, algorithm)
        assert isinstance(auth.Verifier.from_config(cfg.auth).check(signed, "/r"), auth.Grant)


@pytest.fixture
def ec_key_file(tmp_path):
    (tmp_path / "ec.pem").write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    (tmp_path / "secret.txt").write_text("")
    return tmp_path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("auth: {enabled: true}\n", "auth.secret: set one of secret, secret_file or secret_env"),
        (
            "auth: {enabled: true, secret: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa, secret_env: X}\n",
            "auth.secret_env: set only one of secret, secret_file or secret_env",
        ),
        (
            "auth: {enabled: true, secret: short}\n",
            "auth.secret: it holds a secret shorter than 32",
        ),
        (
            "auth: {enabled: true, algorithms: [HS512], secret: " + "a" * 40 + "}\n",
            "auth.secret: it holds a secret shorter than 64",
        ),
        ("auth: {enabled: true, secret_file: nope.txt}\n", "auth.secret_file: cannot read"),
        ("auth: {enabled: true, secret_file: secret.txt}\n", "holds an empty secret"),
        (
            "auth: {enabled: true, secret_env: FASTRELAY_TEST_UNSET_VARIABLE}\n",
            "auth.secret_env: the environment variable FASTRELAY_TEST_UNSET_VARIABLE is not set",
        ),
        (
            "auth: {enabled: true, algorithms: [none]}\n",
            "auth.algorithms: unknown value 'none' (expected one of: HS256, HS384",
        ),
        ("auth: {enabled: true, algorithms: []}\n", "auth.algorithms: list at least one"),
        (
            "auth: {enabled: true, algorithms: [HS256, RS256], secret: " + "a" * 40 + "}\n",
            "auth.algorithms: HS256, RS256 need different kinds of key",
        ),
        (
            "auth: {enabled: true, algorithms: [RS256], public_key_file: ec.pem}\n",
            "auth.public_key_file: '",
        ),
        (
            "auth: {enabled: true, algorithms: [ES256]}\n",
            "auth.public_key_file: set the PEM file",
        ),
        (
            "auth: {enabled: true, algorithms: [ES256], public_key_file: secret.txt}\n",
            "is not a PEM public key",
        ),
        (
            "auth: {enabled: true, algorithms: [ES256], public_key_file: ec.pem, secret: x}\n",
            "auth.secret: ES256 uses public_key_file, not a secret",
        ),
        (
            "auth: {enabled: true, secret: " + "a" * 40 + ", public_key_file: ec.pem}\n",
            "auth.public_key_file: HMAC algorithms use the secret",
        ),
        ("auth: {leeway: 1000}\n", "auth.leeway: 1000.0 is out of range"),
        ("api: {enabled: true, key: " + "k" * 20 + "}\nmetrics: {enabled: false}\n", "api.enabled"),
        ("api: {enabled: true, key: short}\n", "api.key: it holds a secret shorter than 16"),
        ("api: {enabled: true}\n", "api.key: set one of key, key_file or key_env"),
    ],
)
def test_config_errors(ec_key_file, text, expected):
    with pytest.raises(ConfigError) as error:
        load_config(write(ec_key_file, text))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_an_ec_key_for_rs256_names_both_kinds(ec_key_file):
    with pytest.raises(ConfigError) as error:
        load_config(
            write(
                ec_key_file, "auth: {enabled: true, algorithms: [RS256], public_key_file: ec.pem}\n"
            )
        )
    assert "holds an EC P-256 key; RS256 needs an RSA key" in str(error.value)


def test_a_public_key_is_not_accepted_as_an_hmac_secret(tmp_path):
    (tmp_path / "rsa.pem").write_bytes(
        pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    )
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "auth: {enabled: true, secret_file: rsa.pem}\n"))
    assert "auth.secret: a public key cannot be an HMAC secret" in str(error.value)


def test_errors_never_quote_a_secret(tmp_path):
    # A numeric secret is a type error; its value must not be printed.
    secret = "98765432109876543210987654321098765"
    for text in (f"auth: {{secret: {secret}}}\n", f"api: {{key: {secret}}}\n"):
        with pytest.raises(ConfigError) as error:
            load_config(write(tmp_path, text))
        assert "expected a string, got integer" in str(error.value)
        assert secret not in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "auth: {enabled: true, secret: tiny-secret-value}\n"))
    assert "tiny-secret-value" not in str(error.value)
