"""The quick HMAC check (fastrelay/_tokens.pxi) against PyJWT.

It may decline any token (PyJWT then decides), but a token it accepts must
be one PyJWT accepts, with the same claims, under the same configuration.
And it must take the tokens people actually mint, or the speed is gone.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import time
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrelay import auth
from fastrelay._frames import HmacTokens, base64url_decode_canonical

SECRET = b"differential-test-secret-0123456789-abcdefghijklmnopqrstuvwxyz!!"
OTHER_SECRET = b"another-secret-of-the-same-length-0123456789-abcdefghijklmnopqrs"
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# (audience, issuer, leeway, algorithms) as a relay may be configured.
CONFIGS = [
    (None, None, 0.0, ["HS256"]),
    ("relay", None, 0.0, ["HS256"]),
    (None, "issuer", 30.0, ["HS256", "HS512"]),
    ("relay", "issuer", 5.0, ["HS384"]),
]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def reference_decode(segment: bytes) -> bytes | None:
    """Canonical unpadded base64url by the standard library: decode, and
    encoding again gives the segment back."""
    if len(segment) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if base64.urlsafe_b64encode(data).rstrip(b"=") == segment else None


def pyjwt_claims(token: str, audience, issuer, leeway, algorithms) -> dict[str, Any] | None:
    """What the relay asks PyJWT when the quick check declines."""
    try:
        return jwt.PyJWT(options={"require": ["exp"]}).decode(
            token, SECRET, algorithms=algorithms, audience=audience, issuer=issuer, leeway=leeway
        )
    except jwt.PyJWTError:
        return None


def sign(header: object, claims: object, secret: bytes = SECRET, alg: str = "HS256") -> str:
    """A token with exactly this header and payload JSON, whatever they are."""
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    digest = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}.get(alg, "sha256")
    signature = hmac.digest(secret, f"{head}.{body}".encode(), digest)
    return f"{head}.{body}.{b64(signature)}"


# --- base64url ----------------------------------------------------------------


@given(st.binary(max_size=200))
def test_decoding_what_was_encoded_gives_it_back(data):
    assert base64url_decode_canonical(b64(data).encode()) == data


@given(st.text(alphabet=ALPHABET + "=+/.!\x00 ", max_size=40).map(str.encode))
def test_the_decoder_agrees_with_the_standard_library(segment):
    assert base64url_decode_canonical(segment) == reference_decode(segment)


@pytest.mark.parametrize(
    "segment", [b"YWJ", b"YWJ=", b"YQ==", b"YR", b"Y", b"YW+j", b"YW/j", b"YW j", b"YWJj\n"]
)
def test_non_canonical_spellings_are_refused(segment):
    assert base64url_decode_canonical(segment) is None


# --- tokens ---------------------------------------------------------------------

# Times at least 100 s from the clock when drawn (the token is checked
# milliseconds later), so both checks read the same side of every bound.
OFFSETS = st.integers(min_value=100, max_value=10**6)
TIMES = st.one_of(
    OFFSETS.map(lambda d: int(time.time()) + d),
    OFFSETS.map(lambda d: int(time.time()) - d),
    st.floats(min_value=100, max_value=10**6).map(lambda d: time.time() + d),
    st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400), True, False, None]),
    OFFSETS.map(lambda d: str(int(time.time()) + d)),
)
STRINGS = st.one_of(st.sampled_from(["relay", "issuer", "other", ""]), st.integers(), st.none())
AUDIENCES = st.one_of(STRINGS, st.lists(STRINGS, max_size=3))
HEADERS = st.sampled_from(
    [
        {"alg": "HS256", "typ": "JWT"},
        {"typ": "JWT", "alg": "HS256"},
        {"alg": "HS256"},
        {"alg": "HS384", "typ": "JWT"},
        {"alg": "HS512"},
        {"alg": "none", "typ": "JWT"},
        {"alg": "RS256", "typ": "JWT"},
        {"alg": "HS256", "typ": "jwt"},
        {"alg": "HS256", "typ": None},
        {"alg": "HS256", "kid": 7},
        {"alg": "HS256", "kid": "k1"},
        {"alg": "HS256", "crit": ["b64"], "b64": False},
        {"alg": "HS256", "crit": ["exp"]},
        {"alg": ["HS256"]},
        {},
        ["HS256"],
        "HS256",
    ]
)
OPTIONAL = object()  # a claim left out


def usual(draw, good: list[object], anything) -> object:
    """Mostly one of the `good` values, sometimes anything of a strategy."""
    return draw(anything) if draw(st.integers(0, 7)) == 7 else draw(st.sampled_from(good))


@st.composite
def configured_tokens(draw) -> tuple[str, tuple]:
    """A configuration and a token for it: mostly a valid one, with each
    part sometimes replaced by anything (wrong type, value, header, secret,
    spelling), so both answers and every reason to decline come up."""
    config = draw(st.sampled_from(CONFIGS))
    audience, issuer, _, algorithms = config
    future, past = int(time.time()) + 3600, int(time.time()) - 3600
    plain_headers = [{"alg": a, "typ": "JWT"} for a in algorithms] + [{"alg": algorithms[0]}]
    header = usual(draw, plain_headers, HEADERS)
    claims: dict[str, object] = {}
    for name, values, good in [
        ("exp", TIMES, [future, future + 0.5]),
        ("nbf", TIMES, [OPTIONAL, past]),
        ("iat", TIMES, [OPTIONAL, past, past + 0.25]),
        ("aud", AUDIENCES, [OPTIONAL] if audience is None else [audience, [audience, "x"]]),
        ("iss", STRINGS, [OPTIONAL] if issuer is None else [issuer]),
        ("sub", STRINGS, [OPTIONAL, "user-1"]),
        ("jti", STRINGS, [OPTIONAL, "j-1"]),
    ]:
        value = usual(draw, good, st.one_of(st.just(OPTIONAL), values))
        if value is not OPTIONAL:
            claims[name] = value
    claims["rooms"] = ["/r/*"]
    payload: object = claims if draw(st.integers(0, 19)) else [claims]  # rarely not an object
    alg = header.get("alg") if isinstance(header, dict) else None
    secret = usual(draw, [SECRET], st.just(OTHER_SECRET))
    token = sign(header, payload, secret, alg if isinstance(alg, str) else "HS256")
    head, body, signature = token.split(".")
    mutation = usual(draw, ["none"], st.sampled_from(["pad", "flip", "plus", "junk", "dot"]))
    if mutation == "pad":
        signature += "="
    elif mutation == "flip":
        # A fixed range, taken modulo the length: the length follows the
        # clock, and hypothesis needs the same draws to replay a case.
        i = draw(st.integers(0, 4095)) % len(body)
        body = body[:i] + ("A" if body[i] != "A" else "B") + body[i + 1 :]
    elif mutation == "plus":
        signature = signature.replace("-", "+").replace("_", "/")
    elif mutation == "junk":
        body += "!"
    elif mutation == "dot":
        signature += ".x"
    return f"{head}.{body}.{signature}", config


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(configured_tokens())
def test_what_the_quick_check_accepts_pyjwt_accepts_with_the_same_claims(case):
    token, config = case
    audience, issuer, leeway, algorithms = config
    quick = HmacTokens(SECRET, algorithms, audience=audience, issuer=issuer, leeway=leeway)
    claims = quick.claims(token)
    if claims is not None:
        assert pyjwt_claims(token, *config) == claims


@pytest.mark.parametrize("config", CONFIGS)
def test_the_usual_tokens_take_the_quick_path(config):
    audience, issuer, leeway, algorithms = config
    quick = HmacTokens(SECRET, algorithms, audience=audience, issuer=issuer, leeway=leeway)
    alg = algorithms[-1]
    minted = auth.mint(
        SECRET,
        alg,
        ["/a", "/b/*"],
        600,
        subject="user-1",
        audience=audience or "",
        issuer=issuer or "",
    )
    now = time.time()
    claims: dict[str, object] = {"rooms": ["/a"], "publish": True, "exp": now + 600.5}
    claims.update({"nbf": int(now) - 10, "iat": int(now) - 10, "jti": "j-1"})
    if audience:
        claims["aud"] = [audience, "other"]
    if issuer:
        claims["iss"] = issuer
    library = jwt.encode(claims, SECRET, algorithm=alg)  # PyJWT's own header
    for token in (minted, library):
        expected = pyjwt_claims(token, *config)
        assert expected is not None
        assert quick.claims(token) == expected


def test_the_quick_check_never_accepts_an_unverified_or_expired_token():
    quick = HmacTokens(SECRET, ["HS256"], audience=None, issuer=None, leeway=0.0)
    good = auth.mint(SECRET, "HS256", ["/a"], 600)
    head, body, signature = good.split(".")
    assert quick.claims(good) is not None
    assert quick.claims(auth.mint(OTHER_SECRET, "HS256", ["/a"], 600)) is None
    assert quick.claims(auth.mint(SECRET, "HS256", ["/a"], -10)) is None
    assert quick.claims(f"{head}.{body}.") is None
    assert quick.claims(f"{head}.{body}") is None
    assert (
        quick.claims(jwt.encode({"rooms": [], "exp": time.time() + 60}, "", algorithm="none"))
        is None
    )
    assert quick.claims(f"{head}.{body}.{signature}é") is None
    # an expired token is expired at the moment it is asked about
    assert quick.claims(good, now=time.time() + 10**6) is None


def test_the_verifier_asks_pyjwt_only_when_the_quick_check_declines(monkeypatch):
    verifier = auth.Verifier(SECRET, ["HS256"])
    calls: list[str] = []
    decode = verifier._jwt.decode

    def counted(token: str, *args: object, **kwargs: object) -> dict[str, Any]:
        calls.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(verifier._jwt, "decode", counted)
    plain = auth.mint(SECRET, "HS256", ["/a"], 600)
    assert isinstance(verifier.check(plain, "/a"), auth.Grant)
    assert calls == []
    with_kid = jwt.encode(
        {"rooms": ["/a"], "exp": time.time() + 600}, SECRET, algorithm="HS256", headers={"kid": "k"}
    )
    assert isinstance(verifier.check(with_kid, "/a"), auth.Grant)
    expired = auth.mint(SECRET, "HS256", ["/a"], -10)
    denial = verifier.check(expired, "/a")
    assert isinstance(denial, auth.Denial) and denial.detail == "token expired"
    assert calls == [with_kid, expired]
