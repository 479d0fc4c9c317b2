# The upgrade request's common case, in C: a strict scan that either proves a
# request is an ordinary, valid WebSocket upgrade (RFC 6455 section 4.2.1,
# RFC 9112) or defers it to the Python parser (fastrelay/handshake.py), which
# stays the reference for everything: refusals, unusual but valid forms
# (absolute-form targets, percent-encoded paths, bytes above 0x7F, extension
# offers), and access checks. Deferring is always safe; accepting here only
# what the reference accepts, with the same room and the same 101 response,
# is checked by a differential test (tests/test_upgrade_fast.py).

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy


# RFC 6455 section 1.3: appended to the client's key before hashing.
cdef const char *ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
cdef const char *BASE64_DIGITS = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
cdef const char *SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Accept: ")
DEF SWITCHING_LEN = 97
DEF KEY_LEN = 24          # base64 of 16 bytes (RFC 6455 section 4.1)
DEF ACCEPT_LEN = 28       # base64 of a 20-byte SHA-1 digest


cdef inline bint is_tchar(uint8_t c) noexcept nogil:
    # RFC 9110 section 5.6.2: token characters.
    if (c >= b'a' and c <= b'z') or (c >= b'A' and c <= b'Z') or (c >= b'0' and c <= b'9'):
        return True
    return c in b"!#$%&'*+-.^_`|~"


cdef inline bint is_path_char(uint8_t c) noexcept nogil:
    # An origin-form target the reference takes as is: unreserved, sub-delims,
    # ':', '@', '/', '?' (RFC 3986). '%' defers (percent-decoding), so does
    # '#' and anything else.
    if (c >= b'a' and c <= b'z') or (c >= b'A' and c <= b'Z') or (c >= b'0' and c <= b'9'):
        return True
    return c in b"-._~!$&'()*+,;=:@/?"


cdef inline bint is_host_char(uint8_t c) noexcept nogil:
    # The reference's authority characters (handshake._AUTHORITY).
    if (c >= b'a' and c <= b'z') or (c >= b'A' and c <= b'Z') or (c >= b'0' and c <= b'9'):
        return True
    return c in b"-._~%!$&'()*+,;=:[]"


cdef inline bint is_base64(uint8_t c) noexcept nogil:
    return ((c >= b'a' and c <= b'z') or (c >= b'A' and c <= b'Z') or
            (c >= b'0' and c <= b'9') or c == b'+' or c == b'/')


cdef inline bint name_is(const uint8_t *p, size_t n, const char *lower) noexcept nogil:
    """Case-insensitive comparison of a header name with a lower-case one."""
    cdef size_t i
    for i in range(n):
        if lower[i] == 0 or (p[i] | 0x20) != <uint8_t>lower[i]:
            return False
    return lower[n] == 0


cdef bint has_token(const uint8_t *p, size_t n, const char *lower) noexcept nogil:
    """A comma-separated list (RFC 9110 section 5.6.1) holds `lower`,
    compared case-insensitively, spaces around items ignored."""
    cdef size_t start = 0, end, i
    while start <= n:
        end = start
        while end < n and p[end] != b',':
            end += 1
        i = end
        while start < i and (p[start] == b' ' or p[start] == b'\t'):
            start += 1
        while i > start and (p[i - 1] == b' ' or p[i - 1] == b'\t'):
            i -= 1
        if name_is(p + start, i - start, lower):
            return True
        start = end + 1
    return False


cdef bint scan_upgrade(const uint8_t *p, size_t n, size_t max_head, Py_ssize_t max_headers,
                       bint compression, FastRequest *out) noexcept nogil:
    """True when p[:n] starts with a complete, ordinary upgrade request the
    reference parser would accept (filling *out); False defers."""
    cdef size_t i, j, line, colon, vs, ve
    cdef size_t limit = n if n < max_head else max_head
    cdef Py_ssize_t fields = 0
    cdef int hosts = 0, upgrades = 0, connections = 0, versions = 0, keys = 0
    cdef uint8_t c
    # Request line: GET <origin-form target> HTTP/1.1 CRLF
    if limit < 5 or memcmp(p, b"GET /", 5) != 0:
        return False
    i = out.path_start = 4
    out.path_end = 0
    while i < limit and is_path_char(p[i]):
        if p[i] == b'?' and out.path_end == 0:
            out.path_end = i       # the room ends where the query begins
        i += 1
    if out.path_end == 0:
        out.path_end = i
    out.query_start = out.query_end = i
    if out.path_end < i:
        out.query_start = out.path_end + 1
    out.auth_start = out.auth_end = 0
    if i + 11 > limit or memcmp(p + i, b" HTTP/1.1\r\n", 11) != 0:
        return False
    i += 11
    # Header fields, each "name:value CRLF", until the empty line.
    while True:
        if i + 2 > limit:
            return False
        if p[i] == b'\r':
            if p[i + 1] != b'\n':
                return False
            i += 2
            break
        fields += 1
        if fields > max_headers:
            return False
        line = i
        while i < limit and is_tchar(p[i]):
            i += 1
        if i == line or i >= limit or p[i] != b':':
            return False
        colon = i
        i += 1
        while i < limit and (p[i] == b' ' or p[i] == b'\t'):
            i += 1
        vs = i
        # Visible ASCII, SP and HTAB only: controls, bare CR or LF and bytes
        # above 0x7F all defer.
        while i < limit:
            c = p[i]
            if c == b'\r':
                break
            if (c < 0x20 and c != b'\t') or c >= 0x7F:
                return False
            i += 1
        if i + 1 >= limit or p[i + 1] != b'\n':
            return False
        ve = i
        while ve > vs and (p[ve - 1] == b' ' or p[ve - 1] == b'\t'):
            ve -= 1
        i += 2
        if name_is(p + line, colon - line, b"host"):
            hosts += 1
            if ve == vs:
                return False
            for j in range(vs, ve):
                if not is_host_char(p[j]):
                    return False
        elif name_is(p + line, colon - line, b"upgrade"):
            upgrades += 1
            if not has_token(p + vs, ve - vs, b"websocket"):
                return False
        elif name_is(p + line, colon - line, b"connection"):
            connections += 1
            if not has_token(p + vs, ve - vs, b"upgrade"):
                return False
        elif name_is(p + line, colon - line, b"sec-websocket-version"):
            versions += 1
            if ve - vs != 2 or p[vs] != b'1' or p[vs + 1] != b'3':
                return False
        elif name_is(p + line, colon - line, b"sec-websocket-key"):
            keys += 1
            if ve - vs != KEY_LEN or p[vs + 22] != b'=' or p[vs + 23] != b'=':
                return False
            for j in range(vs, vs + 22):
                if not is_base64(p[j]):
                    return False
            out.key_start = vs
        elif name_is(p + line, colon - line, b"authorization"):
            if out.auth_end != 0:
                return False    # several: the reference decides
            out.auth_start = vs
            out.auth_end = ve
        elif (name_is(p + line, colon - line, b"content-length") or
              name_is(p + line, colon - line, b"transfer-encoding")):
            return False
        elif compression and name_is(p + line, colon - line, b"sec-websocket-extensions"):
            return False
    if hosts != 1 or upgrades != 1 or connections != 1 or versions != 1 or keys != 1:
        return False
    out.consumed = i
    return True


cdef inline uint32_t rotl(uint32_t x, int n) noexcept nogil:
    return (x << n) | (x >> (32 - n))


cdef void sha1(const uint8_t *data, size_t n, uint8_t digest[20]) noexcept nogil:
    """SHA-1 (FIPS 180-4) of at most 119 bytes: the handshake hashes 60."""
    cdef uint8_t block[128]
    cdef uint32_t h[5]
    cdef uint32_t w[80]
    cdef uint32_t a, b, c, d, e, f, k, t
    cdef size_t total = 64 if n < 56 else 128
    cdef size_t off
    cdef int i
    cdef uint64_t bits = <uint64_t>n * 8
    memcpy(block, data, n)
    block[n] = 0x80
    for i in range(<int>n + 1, <int>total - 8):
        block[i] = 0
    for i in range(8):
        block[total - 1 - i] = <uint8_t>(bits >> (8 * i))
    h[0] = 0x67452301
    h[1] = 0xEFCDAB89
    h[2] = 0x98BADCFE
    h[3] = 0x10325476
    h[4] = 0xC3D2E1F0
    for off in range(0, total, 64):
        for i in range(16):
            w[i] = ((<uint32_t>block[off + 4 * i] << 24) | (<uint32_t>block[off + 4 * i + 1] << 16)
                    | (<uint32_t>block[off + 4 * i + 2] << 8) | block[off + 4 * i + 3])
        for i in range(16, 80):
            w[i] = rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1)
        a, b, c, d, e = h[0], h[1], h[2], h[3], h[4]
        for i in range(80):
            if i < 20:
                f = (b & c) | (~b & d)
                k = 0x5A827999
            elif i < 40:
                f = b ^ c ^ d
                k = 0x6ED9EBA1
            elif i < 60:
                f = (b & c) | (b & d) | (c & d)
                k = 0x8F1BBCDC
            else:
                f = b ^ c ^ d
                k = 0xCA62C1D6
            t = rotl(a, 5) + f + e + k + w[i]
            e = d
            d = c
            c = rotl(b, 30)
            b = a
            a = t
        h[0] += a
        h[1] += b
        h[2] += c
        h[3] += d
        h[4] += e
    for i in range(5):
        digest[4 * i] = <uint8_t>(h[i] >> 24)
        digest[4 * i + 1] = <uint8_t>(h[i] >> 16)
        digest[4 * i + 2] = <uint8_t>(h[i] >> 8)
        digest[4 * i + 3] = <uint8_t>h[i]


cdef void accept_token(const uint8_t *key, char *out) noexcept nogil:
    """Sec-WebSocket-Accept (RFC 6455 section 4.2.2, step 5.4): base64 of
    SHA-1(key + GUID), ACCEPT_LEN characters into out."""
    cdef uint8_t joined[60]
    cdef uint8_t digest[21]
    cdef int i, j = 0
    cdef uint32_t triple
    memcpy(joined, key, KEY_LEN)
    memcpy(joined + KEY_LEN, ACCEPT_GUID, 36)
    sha1(joined, 60, digest)
    digest[20] = 0
    for i in range(0, 21, 3):
        triple = (<uint32_t>digest[i] << 16) | (<uint32_t>digest[i + 1] << 8) | digest[i + 2]
        out[j] = BASE64_DIGITS[(triple >> 18) & 63]
        out[j + 1] = BASE64_DIGITS[(triple >> 12) & 63]
        out[j + 2] = BASE64_DIGITS[(triple >> 6) & 63]
        out[j + 3] = BASE64_DIGITS[triple & 63]
        j += 4
    out[ACCEPT_LEN - 1] = b'='   # 20 bytes: the last group has one byte of padding
