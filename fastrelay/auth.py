"""Who may join which room and who may speak there: signed tokens (JWT).

The application signs a token; the relay checks it on the upgrade request
without calling anyone. A token carries

- `exp` (required), and `nbf`, `aud`, `iss` checked when present or configured;
- `rooms`: the rooms it may join, each an exact name (`/lobby`), a prefix
  (`/team/*`: every room below `/team/`) or `*` (every room);
- `publish`: whether it may send: `true`, `false`, or room patterns as in
  `rooms`. A token without it may only listen (the safe way to forget it).

The algorithms come from the config, never from the token's header, and
they all need the one configured key: HMAC with a secret, or RSA, ECDSA or
EdDSA with a public key. So `alg: none` and an HS256 token "signed" with the
RSA public key both fail as algorithms not allowed.

PyJWT verifies. An HMAC token in the usual shape goes first to the compiled
quick check (`_frames.HmacTokens`, _tokens.pxi), which accepts only what
PyJWT would accept and hands everything else, every refusal included, to
PyJWT: a new token costs a few microseconds instead of about thirty.

Pure apart from the clock: `Verifier.check` takes the token and the room and
returns a `Grant` or a `Denial`, which the gate (upgrade.py) turns into the
101 or an HTTP refusal.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import unquote

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import HMACAlgorithm

from ._frames import HmacTokens
from .keys import PublicKey, SecretError, SecretSource, read_public_key, read_secret

if TYPE_CHECKING:  # config.py imports this module; the type is all we need
    from .config import AuthConfig

# The kind of key each accepted algorithm is verified with. `none` is not
# here, so no configuration can accept an unsigned token.
KEY_KINDS: dict[str, str] = {
    "HS256": "an HMAC secret",
    "HS384": "an HMAC secret",
    "HS512": "an HMAC secret",
    "RS256": "an RSA key",
    "RS384": "an RSA key",
    "RS512": "an RSA key",
    "PS256": "an RSA key",
    "PS384": "an RSA key",
    "PS512": "an RSA key",
    "ES256": "an EC P-256 key",
    "ES384": "an EC P-384 key",
    "ES512": "an EC P-521 key",
    "EdDSA": "an Ed25519 or Ed448 key",
}
ALGORITHMS = tuple(KEY_KINDS)
_HMAC = "an HMAC secret"

# RFC 7518 §3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

# Shown in WWW-Authenticate (RFC 6750 §3) and in the metrics label.
Reason = Literal["unauthorized", "forbidden_room"]


class Grant(NamedTuple):
    """What a valid token allows in the room it asked for (made on every
    upgrade: a NamedTuple costs half of a frozen dataclass)."""

    read_only: bool
    expires: float  # Unix time the grant ends: exp plus the leeway
    subject: str | None  # the `sub` claim, for debug logs


@dataclass(frozen=True, slots=True)
class Denial:
    reason: Reason
    detail: str  # fixed text: never the token or a claim's value
    error: str | None  # RFC 6750 §3.1 error code; None when no token came

    def challenge(self) -> str:
        """The WWW-Authenticate value for this refusal."""
        if self.error is None:
            return 'Bearer realm="fastrelay"'
        return f'Bearer realm="fastrelay", error="{self.error}", error_description="{self.detail}"'


NO_TOKEN = Denial("unauthorized", "token required", None)


def find_token(query: str, authorization: Sequence[str]) -> str | Denial:
    """The token of an upgrade request: `Authorization: Bearer …` (what
    non-browser clients send) or `?token=…` (browsers cannot set headers
    on a WebSocket). Exactly one token, or a Denial."""
    found = []
    for value in authorization:
        scheme, _, credentials = value.partition(" ")
        # The scheme is case-insensitive (RFC 9110 §11.1); others are not ours.
        if scheme.lower() == "bearer" and credentials.strip():
            found.append(credentials.strip())
    if query:
        for pair in query.split("&"):
            name, _, value = pair.partition("=")
            if name == "token" and value:
                found.append(unquote(value))
    if not found:
        return NO_TOKEN
    if len(found) > 1:
        # Two tokens may grant different things; neither is taken.
        return Denial("unauthorized", "more than one token", "invalid_request")
    return found[0]


def room_matches(patterns: Sequence[str], room: str) -> bool:
    """True if one pattern names `room`: exactly, as a `/prefix/*` with
    something after the prefix, or `*` for every room."""
    for pattern in patterns:
        if pattern == room or pattern == "*":
            return True
        if pattern.endswith("/*"):
            prefix = pattern[:-1]
            if len(room) > len(prefix) and room.startswith(prefix):
                return True
    return False


def _is_patterns(value: object) -> bool:
    return type(value) is list and all(map(isinstance, value, repeat(str)))


def _why(error: jwt.PyJWTError) -> str:
    """A fixed description of a failed check: PyJWT's own messages are not
    passed on, so nothing of the token reaches a response or a log."""
    if isinstance(error, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(error, jwt.ImmatureSignatureError):
        return "token not yet valid"
    if isinstance(error, jwt.InvalidAudienceError):
        return "token for another audience"
    if isinstance(error, jwt.InvalidIssuerError):
        return "token from another issuer"
    if isinstance(error, jwt.MissingRequiredClaimError):
        if error.claim in ("exp", "aud", "iss"):
            return f"token lacks the {error.claim} claim"
        return "token lacks a required claim"
    if isinstance(error, jwt.InvalidAlgorithmError):
        return "token algorithm not allowed"
    if isinstance(error, jwt.InvalidSignatureError):
        return "bad token signature"
    if isinstance(error, jwt.DecodeError):
        return "malformed token"
    return "invalid token"


def _unix_time(value: object) -> float:
    """A NumericDate claim PyJWT accepted (it takes int(value)) as a float;
    an int too large for a float is the end (or the start) of time, not an
    OverflowError."""
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        return math.inf if value > 0 else -math.inf  # type: ignore[operator]


class _Verified(NamedTuple):
    """What a token proved once its signature and fixed claims checked out:
    all that a later sight of the same token needs, besides the clock."""

    rooms: tuple[str, ...]
    publish: bool | tuple[str, ...]
    exp: float
    nbf: float | None
    subject: str | None


class Verifier:
    """Checks tokens against one key and the configured claims.

    A token that verified is remembered (up to CACHE_SIZE of them, the
    oldest forgotten first): its signature, audience, issuer and claims
    cannot change, so the same token again (a reconnect, a second tab) costs
    a lookup and the time checks instead of a signature check. Refused
    tokens are never remembered.
    """

    CACHE_SIZE = 4096

    def __init__(
        self,
        key: bytes | PublicKey,
        algorithms: Sequence[str],
        *,
        audience: str = "",
        issuer: str = "",
        leeway: float = 0.0,
        enforce_expiry: bool = False,
    ) -> None:
        self._key = key
        self._algorithms = list(algorithms)
        self._audience = audience or None
        self._issuer = issuer or None
        self._leeway = leeway
        self.enforce_expiry = enforce_expiry
        self._jwt = jwt.PyJWT(options={"require": ["exp"]})
        # HMAC tokens of the usual shape skip PyJWT's parser (_tokens.pxi);
        # every other token, and every refusal, is PyJWT's.
        self._quick = (
            HmacTokens(key, algorithms, audience=self._audience, issuer=self._issuer, leeway=leeway)
            if isinstance(key, bytes) and all(KEY_KINDS.get(a) == _HMAC for a in algorithms)
            else None
        )
        self._verified: OrderedDict[str, _Verified] = OrderedDict()

    @classmethod
    def from_config(cls, auth: AuthConfig) -> Verifier:
        """Raises SecretError when the key cannot be had (see verification_key)."""
        return cls(
            verification_key(auth),
            auth.algorithms,
            audience=auth.audience,
            issuer=auth.issuer,
            leeway=auth.leeway,
            enforce_expiry=auth.enforce_expiry,
        )

    def check(self, token: str | Denial, room: str) -> Grant | Denial:
        """May the bearer of `token` join `room`, and send there?"""
        if isinstance(token, Denial):
            return token
        verified = self._verified.get(token)
        if verified is None:
            outcome = self._verify(token)
            if isinstance(outcome, Denial):
                return outcome
            verified = outcome
            if len(self._verified) >= self.CACHE_SIZE:
                # O(1), where deleting a plain dict's first key leaves a hole
                # that every later next(iter()) walks past.
                self._verified.popitem(last=False)
            self._verified[token] = verified
        else:
            # The same tests as PyJWT's, against the clock of this upgrade.
            now = time.time()
            if verified.exp <= now - self._leeway:
                del self._verified[token]
                return Denial("unauthorized", "token expired", "invalid_token")
            if verified.nbf is not None and verified.nbf > now + self._leeway:
                return Denial("unauthorized", "token not yet valid", "invalid_token")
        if not room_matches(verified.rooms, room):
            return Denial("forbidden_room", "token does not allow this room", "insufficient_scope")
        publish = verified.publish
        may_send = publish if isinstance(publish, bool) else room_matches(publish, room)
        return Grant(
            read_only=not may_send,
            expires=verified.exp + self._leeway,
            subject=verified.subject,
        )

    def _verify(self, token: str) -> _Verified | Denial:
        """The signature and every claim: by the quick HMAC check when the
        token is plain, else by PyJWT."""
        claims = self._quick.claims(token) if self._quick is not None else None
        if claims is None:
            try:
                claims = self._jwt.decode(
                    token,
                    self._key,
                    algorithms=self._algorithms,
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                )
            except jwt.PyJWTError as e:
                return Denial("unauthorized", _why(e), "invalid_token")
        rooms = claims.get("rooms", [])
        publish = claims.get("publish", False)
        if not _is_patterns(rooms) or not (isinstance(publish, bool) or _is_patterns(publish)):
            return Denial(
                "unauthorized", "rooms and publish claims must be lists of rooms", "invalid_token"
            )
        nbf = claims.get("nbf")  # a number when present: PyJWT checked it
        subject = claims.get("sub")
        return _Verified(
            rooms=tuple(rooms),
            publish=publish if isinstance(publish, bool) else tuple(publish),
            exp=_unix_time(claims["exp"]),
            nbf=None if nbf is None else _unix_time(nbf),
            subject=subject[:64] if isinstance(subject, str) else None,
        )


def verification_key(auth: AuthConfig) -> bytes | PublicKey:
    """The secret or public key that verifies `auth.algorithms`.

    Raises SecretError naming the option at fault: algorithms needing
    different kinds of key, no or several secret sources, a secret shorter
    than the hash (RFC 7518 §3.2) or that is a public key, a public key file
    missing, not PEM, or of another kind than the algorithms need.
    """
    kinds = {KEY_KINDS[alg] for alg in auth.algorithms}
    if len(kinds) != 1:
        raise SecretError(
            "algorithms",
            f"{', '.join(auth.algorithms)} need different kinds of key; list algorithms "
            "of one kind",
        )
    kind = kinds.pop()
    secret_source = SecretSource("secret", auth.secret, auth.secret_file, auth.secret_env)
    if kind == _HMAC:
        if auth.public_key_file:
            raise SecretError("public_key_file", "HMAC algorithms use the secret, not a key file")
        secret = read_secret(secret_source, max(_HMAC_MIN_BYTES[a] for a in auth.algorithms))
        try:
            # PyJWT refuses PEM and SSH public keys as HMAC secrets: a public
            # key used as the secret is what HS/RS confusion exploits.
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
        except jwt.InvalidKeyError:
            raise SecretError("secret", "a public key cannot be an HMAC secret") from None
        return secret
    if auth.secret or auth.secret_file or auth.secret_env:
        raise SecretError("secret", f"{auth.algorithms[0]} uses public_key_file, not a secret")
    key = read_public_key("public_key_file", auth.public_key_file)
    if _kind_of(key) != kind:
        raise SecretError(
            "public_key_file",
            f"'{auth.public_key_file}' holds {_kind_of(key)}; "
            f"{', '.join(auth.algorithms)} needs {kind}",
        )
    return key


def _kind_of(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "an RSA key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"an EC {curve.get(key.curve.name, key.curve.name)} key"
    return "an Ed25519 or Ed448 key"


def signing_secret(auth: AuthConfig) -> bytes:
    """The HMAC secret `fastrelay token` signs with; SecretError otherwise."""
    if KEY_KINDS[auth.algorithms[0]] != _HMAC:
        raise SecretError(
            "algorithms",
            f"fastrelay token signs with the HMAC secret, and {auth.algorithms[0]} tokens "
            "need your private key: mint them in your application",
        )
    key = verification_key(auth)
    assert isinstance(key, bytes)
    return key


def mint(
    secret: bytes,
    algorithm: str,
    rooms: Sequence[str],
    ttl: float,
    *,
    read_only: bool = False,
    subject: str | None = None,
    audience: str = "",
    issuer: str = "",
    now: float | None = None,
) -> str:
    """A token for `rooms`, valid `ttl` seconds from `now` (a negative ttl
    makes one that has already expired)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "rooms": list(rooms),
        "publish": not read_only,
        "iat": issued,
        "exp": issued + math.ceil(ttl),  # whole seconds (RFC 7519 NumericDate), never shorter
    }
    if subject:
        claims["sub"] = subject
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=algorithm)
