"""The fixed contract from an HTTP request to the Casbin request tuple ``(sub, dom, obj, act)``.

Every transport (the gRPC ``Check``, Envoy's HTTP ext_authz variant, ``/v1/explain``,
``citadel authz check``) goes through ``request_tuple`` so a policy means the same thing
however it is asked. Policies are written against this mapping:

``sub``
    ``attributes.source.principal`` exactly as Envoy sends it (the mTLS peer's SPIFFE URI),
    or ``anonymous`` when empty. Over gRPC it is *never* taken from a header: headers are
    set by the caller, the peer principal by Envoy's TLS handshake. The HTTP variant reads
    ``x-forwarded-client-cert`` (``URI=``) only when the operator says the proxy in front is
    trusted (``--trust-xfcc``).
``dom``
    The request's host, lowercased, port removed, one trailing dot removed
    (``Orders.Shop:8080`` -> ``orders.shop``; ``[::1]:80`` -> ``[::1]``). A host with
    characters no DNS name or IP literal has is refused.
``obj``
    The path, query and fragment removed, then normalised the way RFC 3986 section 6 says:
    percent-encoded unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded, other
    escapes kept with uppercase hex, repeated slashes merged, dot-segments removed (``..``
    never climbs above ``/``), a trailing slash kept.
``act``
    The HTTP method, uppercase.

A request whose path could mean two things to two servers is denied, never guessed
(``Refused``, HTTP 403 with the reason): an encoded ``/`` or ``\\`` (``%2F``, ``%5C``), a raw
backslash, NUL (raw or ``%00``) or any other control character, an invalid escape, an escape
sequence that is not UTF-8, raw non-ASCII, a path not starting with ``/``, a path longer
than ``MAX_PATH_BYTES``, or a ``;`` (raw or ``%3B``). Why: the policy sees one spelling
while the upstream may decode the same bytes into another path (``/admin%2Fx`` is
``/admin/x`` to some servers), which is how path-based authorization gets bypassed. The
semicolon is refused because servlet containers (Tomcat, Jetty, Spring) strip path
parameters before routing while Envoy and most others keep them: ``/api/..;/admin`` is
``/admin`` to Tomcat and ``/api/..;/admin`` to everyone else, and ``/admin;x/users``
slips past a ``/admin/*`` deny rule yet reaches ``/admin/users`` there. A
``CheckRequest`` without HTTP attributes (Envoy's network filter sends none) is refused
with HTTP 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "ANONYMOUS",
    "MAX_HOST_BYTES",
    "MAX_PATH_BYTES",
    "Refused",
    "RequestTuple",
    "normalize_host",
    "normalize_method",
    "normalize_path",
    "principal_from_xfcc",
    "request_tuple",
    "trace_id_from",
]

ANONYMOUS = "anonymous"
MAX_PATH_BYTES = 4096
MAX_HOST_BYTES = 255 + 8  # a DNS name plus ":port"
RAW_PATH_AUDIT_CHARS = 256

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Printable ASCII minus space, backslash and ``;``: anything else raw in a path is refused.
_PATH_CHARS_OK = re.compile(r"[!-:<-\[\]-~]*")
_HOST_OK = re.compile(r"[a-z0-9_.\-]*|\[[0-9a-f:.]+\]")
_METHOD_OK = re.compile(r"[A-Z0-9!#$%&'*+.^_`|~\-]{1,32}")
_PORT_OK = re.compile(r"[0-9]{0,5}")
_HEX_TRACE = re.compile(r"[0-9a-f]{16,32}")


class Refused(Exception):
    """The request cannot be decided as asked; deny it with ``http_status`` and ``code``.

    ``code`` is a short stable name (recorded in the audit trail and counted in metrics);
    ``message`` says what was wrong in words a person can act on.
    """

    def __init__(self, code: str, message: str, *, http_status: int = 403) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


@dataclass(frozen=True, slots=True)
class RequestTuple:
    sub: str
    dom: str
    obj: str
    act: str

    def as_dict(self) -> dict[str, str]:
        return {"sub": self.sub, "dom": self.dom, "obj": self.obj, "act": self.act}


def _ambiguous(code: str, what: str) -> Refused:
    return Refused(code, f"ambiguous path: {what}; refused rather than guessed")


def normalize_path(raw: str) -> str:
    """The ``obj`` of a raw request path (see the module docstring); raises ``Refused``."""
    # Query and fragment go first: whatever follows them is not part of the path.
    cut = len(raw)
    q = raw.find("?")
    if q >= 0:
        cut = q
    h = raw.find("#", 0, cut)
    if h >= 0:
        cut = h
    path = raw[:cut]
    if len(path) > MAX_PATH_BYTES:
        raise _ambiguous("path_too_long", f"longer than {MAX_PATH_BYTES} bytes")
    if not path.startswith("/"):
        if not path:
            raise _ambiguous("path_empty", "the path is empty")
        raise _ambiguous("path_not_absolute", "the path does not start with '/'")
    if _PATH_CHARS_OK.fullmatch(path) is None:
        if "\\" in path:
            raise _ambiguous("path_backslash", "raw backslash")
        if "\x00" in path:
            raise _ambiguous("path_nul", "NUL byte")
        if not path.isascii():
            raise _ambiguous("path_non_ascii", "raw non-ASCII characters")
        if ";" in path:
            raise _ambiguous("path_semicolon", "path parameters (';') mean different paths "
                             "to different servers")  # fmt: skip
        raise _ambiguous("path_control_char", "control character or space")
    # Fast path: nothing to decode, no empty or dot segments. Most traffic ends here.
    if "%" not in path and "//" not in path and "/." not in path:
        return path
    if "%" in path:
        path = _decode_unreserved(path)
    return _remove_dot_segments(path)


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    high = False  # any escape of a non-ASCII byte: then the escapes must spell UTF-8
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        pair = path[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise _ambiguous("path_invalid_escape", f"invalid percent-escape {path[i : i + 3]!r}")
        byte = int(pair, 16)
        if byte == 0x2F:
            raise _ambiguous("path_encoded_slash", "encoded slash (%2F)")
        if byte == 0x5C:
            raise _ambiguous("path_encoded_backslash", "encoded backslash (%5C)")
        if byte == 0x00:
            raise _ambiguous("path_nul", "encoded NUL (%00)")
        if byte == 0x3B:
            raise _ambiguous("path_semicolon", "encoded semicolon (%3B)")
        if byte < 0x20 or byte == 0x7F:
            raise _ambiguous("path_control_char", f"encoded control character (%{pair})")
        ch = chr(byte)
        if ch in _UNRESERVED:
            out.append(ch)
        else:
            out.append("%" + pair.upper())
        high = high or byte >= 0x80
        i += 3
    if high:
        try:
            # Escapes of non-ASCII bytes must spell UTF-8, else servers disagree on them.
            _escaped_bytes_utf8(path)
        except UnicodeDecodeError as exc:
            raise _ambiguous("path_not_utf8", "percent-escapes that are not UTF-8") from exc
    return "".join(out)


def _escaped_bytes_utf8(path: str) -> None:
    """Raise ``UnicodeDecodeError`` unless each run of escapes decodes as UTF-8."""
    run = bytearray()
    i, n = 0, len(path)
    while i < n:
        if path[i] == "%":
            run.append(int(path[i + 1 : i + 3], 16))
            i += 3
            continue
        if run:
            run.decode("utf-8")
            run.clear()
        i += 1
    if run:
        run.decode("utf-8")


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    last = segments[-1]
    trailing = last in ("", ".", "..") and bool(out)
    return "/" + "/".join(out) + ("/" if trailing else "")


def normalize_host(raw: str) -> str:
    """The ``dom`` of a Host/:authority value; raises ``Refused`` for a malformed one."""
    if len(raw) > MAX_HOST_BYTES:
        raise Refused("host_invalid", "host is too long")
    host = raw.lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise Refused("host_invalid", "unterminated IPv6 literal in host")
        rest = host[end + 1 :]
        host = host[: end + 1]
        if rest and (not rest.startswith(":") or _PORT_OK.fullmatch(rest[1:]) is None):
            raise Refused("host_invalid", "malformed port in host")
    else:
        colon = host.find(":")
        if colon >= 0:
            if _PORT_OK.fullmatch(host[colon + 1 :]) is None:
                raise Refused("host_invalid", "malformed port in host (IPv6 needs brackets)")
            host = host[:colon]
        if host.endswith("."):
            host = host[:-1]
    if _HOST_OK.fullmatch(host) is None:
        raise Refused("host_invalid", "host has characters no DNS name or IP literal has")
    return host


def normalize_method(raw: str) -> str:
    method = raw.upper()
    if _METHOD_OK.fullmatch(method) is None:
        raise Refused("method_invalid", "the HTTP method is missing or malformed", http_status=400)
    return method


# Hosts and methods repeat across requests (paths do not): remember the normalised form of
# well-formed ones. Bounded by clearing, so a flood of distinct hosts costs memory once.
_HOST_CACHE: dict[str, str] = {}
_METHOD_CACHE: dict[str, str] = {}
_CACHE_MAX = 4096


def request_tuple(*, principal: str, host: str, method: str, path: str) -> RequestTuple:
    """The Casbin tuple of one request; raises ``Refused`` for a request it cannot name."""
    dom = _HOST_CACHE.get(host)
    if dom is None:
        dom = normalize_host(host)
        if len(_HOST_CACHE) >= _CACHE_MAX:
            _HOST_CACHE.clear()
        _HOST_CACHE[host] = dom
    act = _METHOD_CACHE.get(method)
    if act is None:
        act = normalize_method(method)
        if len(_METHOD_CACHE) >= _CACHE_MAX:
            _METHOD_CACHE.clear()
        _METHOD_CACHE[method] = act
    return RequestTuple(principal or ANONYMOUS, dom, normalize_path(path), act)


def trace_id_from(headers: dict[str, str] | object) -> str | None:
    """The trace id of W3C ``traceparent`` or B3 ``x-b3-traceid``, if well-formed."""
    get = headers.get  # type: ignore[attr-defined]
    tp = get("traceparent")
    if tp:
        parts = tp.split("-")
        if len(parts) >= 4 and len(parts[1]) == 32 and _HEX_TRACE.fullmatch(parts[1]):
            return parts[1]
    b3 = get("x-b3-traceid")
    if b3 and _HEX_TRACE.fullmatch(b3.lower()):
        return b3.lower()
    return None


def principal_from_xfcc(value: str) -> str:
    """The ``URI=`` of the last element of an ``x-forwarded-client-cert`` header.

    The last element is the one the nearest (trusted) proxy added about its own client.
    An element with two ``URI=`` fields is ambiguous and refused; none means anonymous.
    """
    element = _split_xfcc(value, ",")[-1] if value else ""
    uris = []
    for pair in _split_xfcc(element, ";"):
        key, sep, val = pair.partition("=")
        if sep and key.strip().lower() == "uri":
            val = val.strip()
            if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
                val = val[1:-1].replace('\\"', '"')
            uris.append(val)
    if len(uris) > 1:
        raise Refused("xfcc_ambiguous", "x-forwarded-client-cert names more than one URI")
    return uris[0] if uris and uris[0] else ANONYMOUS


def _split_xfcc(value: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (XFCC quotes values holding , ; or =)."""
    parts: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            buf.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            buf.append(ch)
            escaped = True
        elif ch == '"':
            buf.append(ch)
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return parts
