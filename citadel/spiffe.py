"""SPIFFE identities as small immutable value objects.

Rules are those of the SPIFFE-ID standard (spiffe/spiffe ``standards/SPIFFE-ID.md``):
scheme ``spiffe``; a non-empty trust domain of lowercase letters, digits, ``.``, ``-``
and ``_`` (which already excludes ports, userinfo and percent-encoding); path segments
of ``[A-Za-z0-9._-]``, never empty, ``.`` or ``..``; no trailing slash, query or
fragment; at most 255 bytes of trust domain and 2048 bytes in all.

Values are validated once in ``__init__`` and never compare equal to a plain ``str``
(comparison with a foreign type returns ``NotImplemented``), so a string that merely
looks like an ID can never stand in for a checked one.
"""

from __future__ import annotations

from typing import Final

from citadel.errors import InvalidSpiffeId

__all__ = ["MAX_ID_BYTES", "MAX_TRUST_DOMAIN_BYTES", "SpiffeId", "TrustDomain"]

SCHEME_PREFIX: Final = "spiffe://"
MAX_ID_BYTES: Final = 2048
MAX_TRUST_DOMAIN_BYTES: Final = 255

_TD_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_SEGMENT_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"
)


def _utf8_len(text: str) -> int:
    """Byte length; text that is not encodable (lone surrogates, e.g. from a JSON
    ``\\udcxx`` escape in a token claim) is an invalid ID, not a crash."""
    try:
        return len(text.encode())
    except UnicodeEncodeError as exc:
        raise InvalidSpiffeId("SPIFFE ID is not valid Unicode text") from exc


def _check_trust_domain(name: str) -> None:
    if not name:
        raise InvalidSpiffeId("trust domain is missing")
    if _utf8_len(name) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeId(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    bad = set(name) - _TD_CHARS
    if bad:
        raise InvalidSpiffeId(
            "trust domain characters must be lowercase letters, numbers, dots, dashes or "
            f"underscores (found {''.join(sorted(bad))!r})"
        )


def _check_segment(segment: str) -> None:
    if not segment:
        raise InvalidSpiffeId("path cannot contain empty segments or a trailing slash")
    if segment in (".", ".."):
        raise InvalidSpiffeId("path cannot contain dot segments")
    bad = set(segment) - _SEGMENT_CHARS
    if bad:
        raise InvalidSpiffeId(
            "path segment characters must be letters, numbers, dots, dashes or underscores "
            f"(found {''.join(sorted(bad))!r})"
        )


class TrustDomain:
    """The trust domain part of a SPIFFE ID (``example.org``)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise InvalidSpiffeId("trust domain must be a string")
        if name.startswith(SCHEME_PREFIX):
            name = SpiffeId(name).trust_domain.name
        _check_trust_domain(name)
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own ID (``spiffe://td``), used on signing certificates."""
        return SpiffeId(SCHEME_PREFIX + self._name)

    def workload(self, namespace: str, service_account: str) -> SpiffeId:
        """``spiffe://<td>/ns/<namespace>/sa/<service_account>``: the Kubernetes convention."""
        return SpiffeId.from_segments(self, "ns", namespace, "sa", service_account)

    def __str__(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"TrustDomain({self._name!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustDomain):
            return NotImplemented
        return self._name == other._name

    def __hash__(self) -> int:
        return hash(("TrustDomain", self._name))

    def __setattr__(self, key: str, value: object) -> None:
        if hasattr(self, "_name"):
            raise AttributeError("TrustDomain is immutable")
        object.__setattr__(self, key, value)


class SpiffeId:
    """A validated SPIFFE ID (``spiffe://example.org/ns/default/sa/web``)."""

    __slots__ = ("_path", "_trust_domain", "_uri")

    def __init__(self, uri: str) -> None:
        if not isinstance(uri, str):
            raise InvalidSpiffeId("SPIFFE ID must be a string")
        if not uri:
            raise InvalidSpiffeId("SPIFFE ID cannot be empty")
        if _utf8_len(uri) > MAX_ID_BYTES:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
        if not uri.startswith(SCHEME_PREFIX):
            raise InvalidSpiffeId("scheme is missing or invalid: a SPIFFE ID starts 'spiffe://'")
        rest = uri[len(SCHEME_PREFIX) :]
        td_name, sep, path = rest.partition("/")
        _check_trust_domain(td_name)
        if sep:
            for segment in path.split("/"):
                _check_segment(segment)
        object.__setattr__(self, "_trust_domain", TrustDomain(td_name))
        object.__setattr__(self, "_path", sep + path)
        object.__setattr__(self, "_uri", uri)

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain | str, *segments: str) -> SpiffeId:
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        for segment in segments:
            if not isinstance(segment, str):
                raise InvalidSpiffeId("path segments must be strings")
            _check_segment(segment)
        path = "".join("/" + s for s in segments)
        return cls(SCHEME_PREFIX + td.name + path)

    @classmethod
    def from_istio_principal(cls, principal: str) -> SpiffeId:
        """Parse Istio's scheme-less principal form ``<td>/ns/<ns>/sa/<sa>``."""
        if principal.startswith(SCHEME_PREFIX):
            raise InvalidSpiffeId("an Istio principal is written without the 'spiffe://' scheme")
        return cls(SCHEME_PREFIX + principal)

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def path(self) -> str:
        return self._path

    @property
    def istio_principal(self) -> str:
        """Istio's principal form: the ID without its scheme."""
        return self._uri[len(SCHEME_PREFIX) :]

    @property
    def kubernetes_identity(self) -> tuple[str, str] | None:
        """``(namespace, service_account)`` when the path is ``/ns/<ns>/sa/<sa>``."""
        parts = self._path.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self._trust_domain == trust_domain

    def __str__(self) -> str:
        return self._uri

    def __repr__(self) -> str:
        return f"SpiffeId({self._uri!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpiffeId):
            return NotImplemented
        return self._uri == other._uri

    def __hash__(self) -> int:
        return hash(("SpiffeId", self._uri))

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("SpiffeId is immutable")
