# The quick check for HMAC-signed tokens of the usual shape (auth.Verifier
# asks it first when the relay verifies with a secret).
#
# jwt.decode spends about 30 µs on a new HS256 token, most of it parsing in
# Python (a per-character base64 check, option merging, a call per claim):
# more than the rest of a handshake. This says yes to a token only when every
# part of it is in the plain form that `fastrelay token`, PyJWT and the other
# common JWT libraries mint:
#
# - three segments of canonical unpadded base64url (RFC 7515 section 2, 7.1);
# - a header holding only `alg`, one of the configured HMAC algorithms, and
#   optionally `typ: "JWT"`;
# - a signature that PyJWT's own algorithm object (jwt.algorithms.HMACAlgorithm,
#   OpenSSL's HMAC and hmac.compare_digest) verifies with the configured secret;
# - a payload that is a UTF-8 JSON object, nothing around it, whose registered
#   claims (RFC 7519 section 4.1) all hold and are of plain types: `exp`
#   (required), `nbf` and `iat` numbers, `iss`, `sub`, `jti` strings, `aud` a
#   string or a list of strings.
#
# For anything else, including every token that fails one of these, `claims`
# returns None and the caller asks jwt.decode for the verdict. So this can only
# accept what PyJWT would accept (tests/test_hmac_tokens.py compares the two
# on the token matrix and on generated tokens), and every refusal and its
# reason stay PyJWT's.

import json
import math
import time

from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr

from jwt.algorithms import get_default_algorithms


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    const char *PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL


# base64url's digits (RFC 4648 section 5): a character's value, or -1.
cdef signed char BASE64URL_VALUE[256]


cdef void _fill_base64url_values() noexcept:
    cdef const char *digits = (
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    cdef int i
    for i in range(256):
        BASE64URL_VALUE[i] = -1
    for i in range(64):
        BASE64URL_VALUE[<uint8_t>digits[i]] = i


_fill_base64url_values()

# Header segments already seen to be plain, and the algorithm each names:
# an issuer signs every token with the same header, so it is parsed once.
DEF HEADERS_REMEMBERED = 16
# The longest signature segment read: HS512's 64 bytes are 86 characters.
DEF SIGNATURE_MAX = 64


cdef Py_ssize_t base64url_decode(const uint8_t *src, Py_ssize_t n, uint8_t *out) noexcept nogil:
    """Decode canonical unpadded base64url into `out` (room for n * 3 / 4
    bytes); the decoded length, or -1 if `src` is not that: a character
    outside the alphabet (padding included), a length of 1 modulo 4, or
    spare bits that are not zero (so one value has one spelling)."""
    cdef Py_ssize_t i = 0, o = 0
    cdef int a, b, c, d
    while i + 4 <= n:
        a = BASE64URL_VALUE[src[i]]
        b = BASE64URL_VALUE[src[i + 1]]
        c = BASE64URL_VALUE[src[i + 2]]
        d = BASE64URL_VALUE[src[i + 3]]
        if (a | b | c | d) < 0:
            return -1
        out[o] = <uint8_t>((a << 2) | (b >> 4))
        out[o + 1] = <uint8_t>(((b & 15) << 4) | (c >> 2))
        out[o + 2] = <uint8_t>(((c & 3) << 6) | d)
        i += 4
        o += 3
    if n - i == 2:
        a = BASE64URL_VALUE[src[i]]
        b = BASE64URL_VALUE[src[i + 1]]
        if (a | b) < 0 or b & 15:
            return -1
        out[o] = <uint8_t>((a << 2) | (b >> 4))
        o += 1
    elif n - i == 3:
        a = BASE64URL_VALUE[src[i]]
        b = BASE64URL_VALUE[src[i + 1]]
        c = BASE64URL_VALUE[src[i + 2]]
        if (a | b | c) < 0 or c & 3:
            return -1
        out[o] = <uint8_t>((a << 2) | (b >> 4))
        out[o + 1] = <uint8_t>(((b & 15) << 4) | (c >> 2))
        o += 2
    elif n - i == 1:
        return -1
    return o


def base64url_decode_canonical(bytes segment):
    """The bytes of a canonical unpadded base64url segment, or None (for
    tests: the quick check's decoder against the standard library's)."""
    cdef Py_ssize_t n = len(segment)
    out = PyBytes_FromStringAndSize(NULL, n * 3 // 4)
    cdef Py_ssize_t m = base64url_decode(
        <const uint8_t *>PyBytes_AS_STRING(segment), n, <uint8_t *>PyBytes_AS_STRING(out))
    return None if m < 0 else out[:m]


cdef inline bint is_numeric_date(object value):
    """A NumericDate (RFC 7519 section 2) as JSON numbers arrive: an int or a
    finite float. PyJWT would also take numeric strings and booleans; those
    go to it."""
    return type(value) is int or (type(value) is float and math.isfinite(value))


cdef class HmacTokens:
    """Accepts plain HMAC tokens signed with one secret: `claims(token)`
    returns their claims, or None for anything else."""

    cdef bytes secret
    cdef dict algorithms  # the configured names -> PyJWT's HMACAlgorithm
    cdef dict headers  # plain header segments seen -> their algorithm
    cdef object audience  # str or None, as PyJWT is given them
    cdef object issuer
    cdef double leeway
    cdef object json_object  # json.JSONDecoder().raw_decode

    def __init__(self, bytes secret, algorithms, *, audience, issuer, double leeway):
        known = get_default_algorithms()
        self.algorithms = {name: known[name] for name in algorithms}
        self.secret = next(iter(self.algorithms.values())).prepare_key(secret)
        self.headers = {}
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.json_object = json.JSONDecoder().raw_decode

    def claims(self, str token, now=None):
        """The token's claims if it is plain, signed with the secret and
        valid at `now` (default: time.time(), the clock PyJWT reads)."""
        if not PyUnicode_IS_ASCII(token):
            return None
        cdef Py_ssize_t n
        cdef const char *text = PyUnicode_AsUTF8AndSize(token, &n)
        cdef const char *dot1 = <const char *>memchr(text, b'.', n)
        if dot1 == NULL:
            return None
        cdef const char *dot2 = <const char *>memchr(dot1 + 1, b'.', n - (dot1 + 1 - text))
        if dot2 == NULL or memchr(dot2 + 1, b'.', n - (dot2 + 1 - text)) != NULL:
            return None
        header = PyBytes_FromStringAndSize(text, dot1 - text)
        algorithm = self.headers.get(header)
        if algorithm is None:
            algorithm = self.plain_header(header)
            if algorithm is None:
                return None
        cdef uint8_t signature[SIGNATURE_MAX]
        cdef Py_ssize_t sig_chars = n - (dot2 + 1 - text)
        if sig_chars > (SIGNATURE_MAX * 4 + 2) // 3:
            return None
        cdef Py_ssize_t sig_len = base64url_decode(
            <const uint8_t *>dot2 + 1, sig_chars, signature)
        if sig_len < 0:
            return None
        signing_input = PyBytes_FromStringAndSize(text, dot2 - text)
        if not algorithm.verify(
                signing_input, self.secret, PyBytes_FromStringAndSize(<char *>signature, sig_len)):
            return None
        cdef Py_ssize_t payload_chars = dot2 - (dot1 + 1)
        body = PyBytes_FromStringAndSize(NULL, payload_chars * 3 // 4)
        cdef Py_ssize_t body_len = base64url_decode(
            <const uint8_t *>dot1 + 1, payload_chars, <uint8_t *>PyBytes_AS_STRING(body))
        if body_len < 0:
            return None
        try:
            document = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(body), body_len, NULL)
            claims, end = self.json_object(document)
        except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError
            return None
        if type(claims) is not dict or end != len(document):
            return None
        if not self.plain_claims(claims, time.time() if now is None else now):
            return None
        return claims

    cdef object plain_header(self, bytes segment):
        """The algorithm a header names if it is plain, remembered; else None."""
        data = base64url_decode_canonical(segment)
        if data is None:
            return None
        try:
            header, end = self.json_object(PyUnicode_DecodeUTF8(data, len(data), NULL))
        except (ValueError, RecursionError):
            return None
        if type(header) is not dict or not header.keys() <= {"alg", "typ"}:
            return None  # kid, crit, b64 and the rest: PyJWT's to judge
        name = header.get("alg")
        if type(name) is not str or name not in self.algorithms:
            return None
        if header.get("typ", "JWT") != "JWT":
            return None
        algorithm = self.algorithms[name]
        if len(self.headers) < HEADERS_REMEMBERED:
            self.headers[segment] = algorithm
        return algorithm

    cdef bint plain_claims(self, dict claims, double now):
        """PyJWT's claim checks (jwt.api_jwt.PyJWT._validate_claims, with
        `exp` required) narrowed to plain types; int() truncates a
        NumericDate there, so it does here."""
        exp = claims.get("exp")
        if not is_numeric_date(exp) or int(exp) <= now - self.leeway:
            return False
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is not None or name in claims:
                if not is_numeric_date(value) or int(value) > now + self.leeway:
                    return False
        if self.issuer is not None and claims.get("iss") != self.issuer:
            return False
        if "aud" in claims:
            aud = claims["aud"]
            if self.audience is None:
                return False  # PyJWT refuses an audience nobody configured
            if aud != self.audience and not (
                    type(aud) is list and all(type(a) is str for a in aud)
                    and self.audience in aud):
                return False
        elif self.audience is not None:
            return False
        for name in ("iss", "sub", "jti"):
            if name in claims and type(claims[name]) is not str:
                return False
        return True
