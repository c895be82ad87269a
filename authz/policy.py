"""A policy as an immutable value: the Casbin model text, its rows, and a revision hash.

The revision is a content hash of the model and policy files, so every decision's audit
record can name exactly which rules decided it, and replicas that loaded the same files
agree on the name.
"""

from __future__ import annotations

import bisect
import collections
import functools
import hashlib
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from authz.pacing import breathe
from citadel.errors import PolicyError

__all__ = [
    "MODEL_FILE",
    "POLICY_FILE",
    "REQUEST_ARITY",
    "Policy",
    "PolicyBytes",
    "PolicyReader",
    "RowSplice",
    "common_affixes",
    "load_policy_dir",
    "parse_policy_rows",
    "policy_shape",
    "rule_counts",
    "validate_policy",
]

#: Every Check calls the model with (sub, dom, obj, act); see authz/request.py.
REQUEST_ARITY = 4

MODEL_FILE = "model.conf"
POLICY_FILE = "policy.csv"


@dataclass(frozen=True, slots=True)
class Policy:
    model_text: str
    #: Each row with its ptype first, e.g. ``("p", sub, dom, obj, act, eft)``, ``("g", u, r, d)``.
    rows: tuple[tuple[str, ...], ...]
    revision: str
    source: str
    #: 1-based line of each row in ``policy.csv`` (parallel to ``rows``), for error messages.
    lines: tuple[int, ...] = ()
    #: How ``rows`` derive from the previous read's (None: read whole). Not content.
    splice: RowSplice | None = field(default=None, compare=False, repr=False)

    @property
    def policy_text(self) -> str:
        return "\n".join(", ".join(r) for r in self.rows)

    @classmethod
    def from_texts(cls, model_text: str, policy_text: str, *, source: str = "<memory>") -> Policy:
        rows, lines = parse_policy_rows(policy_text, file=POLICY_FILE)
        return cls(
            model_text=model_text,
            rows=rows,
            revision=revision_of(model_text, policy_text),
            source=source,
            lines=lines,
        )


def revision_of(model_text: str, policy_text: str) -> str:
    return _revision(model_text.encode(), policy_text.encode())


def _revision(model: bytes, policy: bytes) -> str:
    return _digest(model, policy)[:16]


def _digest(model: bytes, policy: bytes) -> str:
    h = hashlib.sha256()
    for data in (model, policy):
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class PolicyBytes:
    """``model.conf`` and ``policy.csv`` as already read (and hashed) by the caller."""

    model: bytes
    policy: bytes
    #: SHA-256 over both, as the revision hashes them (the revision is its first 16).
    digest: str

    @classmethod
    def of(cls, model: bytes, policy: bytes) -> PolicyBytes:
        return cls(model, policy, _digest(model, policy))


def split_policy_line(line: str) -> list[str]:
    """Split one policy line exactly as pycasbin's ``load_policy_line`` does.

    Commas inside ``(...)`` or ``[...]`` do not split (so ``^(GET,POST)$`` stays one value)
    and there is no CSV quoting; each value is stripped. Unlike pycasbin, unbalanced
    brackets raise ``ValueError`` instead of an ``IndexError`` from deep inside the loader.

    Fast path: when every comma-separated piece has balanced brackets on its own, every
    comma is at depth 0 and the line splits exactly like ``str.split(",")``; only pieces
    that contain brackets are scanned. That keeps a 10,000-row policy's parse at tens of
    milliseconds instead of a character loop over every line (~160 ms) on each load. Any
    other line (commas inside brackets, errors, a leading comma) takes the full loop.
    """
    if line and line[0] != ",":
        parts = line.split(",")
        try:
            for part in parts:
                if not _BRACKETS.isdisjoint(part):
                    _split_bracketed(part)  # raises unless balanced by itself
        except ValueError:
            pass
        else:
            return [t.strip() for t in parts]
    return _split_bracketed(line)


_BRACKETS = frozenset("[(])")


def _split_bracketed(line: str) -> list[str]:
    depth = 0
    tokens: list[str] = []
    for c in line:
        if c in "[(":
            if not tokens:
                raise ValueError(f"row starts with {c!r}")
            depth += 1
            tokens[-1] += c
        elif c in "])":
            if depth == 0:
                raise ValueError(f"unbalanced {c!r}")
            depth -= 1
            tokens[-1] += c
        elif c == "," and depth == 0:
            tokens.append("")
        elif not tokens:
            tokens.append(c)
        else:
            tokens[-1] += c
    if depth:
        raise ValueError("unclosed '(' or '['")
    return [t.strip() for t in tokens]


def parse_policy_rows(
    text: str | list[str], *, file: str = POLICY_FILE, first_line: int = 1
) -> tuple[tuple[tuple[str, ...], ...], tuple[int, ...]]:
    """Parse policy lines the way pycasbin's file adapter does, with file:line errors.
    ``text`` may be lines already split on ``\\n``, the first of them ``first_line``."""
    rows: list[tuple[str, ...]] = []
    lines: list[int] = []
    split = text.split("\n") if isinstance(text, str) else text
    for lineno, line in enumerate(split, start=first_line):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            fields = split_policy_line(stripped)
        except ValueError as exc:
            raise PolicyError(f"malformed policy row: {exc}", file=file, line=lineno) from exc
        if len(fields) < 2 or not fields[0]:
            raise PolicyError(
                "policy row needs a type and at least one value", file=file, line=lineno
            )
        rows.append(tuple(fields))
        lines.append(lineno)
    return tuple(rows), tuple(lines)


def _read_raw(d: Path) -> tuple[str, bytes]:
    """``model.conf`` as text and ``policy.csv`` as bytes (decoded only where it changed)."""
    out: list[str | bytes] = []
    for name in (MODEL_FILE, POLICY_FILE):
        try:
            path = d / name
            out.append(
                path.read_text(encoding="utf-8") if name == MODEL_FILE else path.read_bytes()
            )
        except FileNotFoundError as exc:
            raise PolicyError(f"{name} is missing in {d}", file=name) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read {name}: {exc}", file=name) from exc
    return out[0], out[1]  # type: ignore[return-value]


def _given_texts(given: PolicyBytes) -> tuple[str | None, bytes]:
    """The model's text and the policy's bytes from ``given``; no text when the model is
    not UTF-8 (the caller then reads the files itself, which reports it)."""
    try:
        model = given.model.decode("utf-8")
    except UnicodeDecodeError:
        return None, b""
    return _universal_newlines(model), given.policy


def _decode(raw: bytes, *, first_line: int = 1) -> str:
    """What ``read_text(encoding="utf-8")`` gives (UTF-8, universal newlines) for
    ``policy.csv`` bytes starting on line ``first_line``; a byte that is not UTF-8 is
    refused with its line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        raise PolicyError(
            f"cannot read {POLICY_FILE}: not UTF-8 (byte 0x{bad}: {exc.reason})",
            file=POLICY_FILE,
            line=first_line + raw.count(b"\n", 0, exc.start),
        ) from exc
    return _universal_newlines(text)


def _universal_newlines(text: str) -> str:
    """``\\r\\n`` and a lone ``\\r`` read as ``\\n``, as text-mode reads do."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def load_policy_dir(directory: str | Path) -> Policy:
    """Read ``model.conf`` and ``policy.csv`` (through symlinks, as a mounted ConfigMap has)."""
    policy = PolicyReader().read(directory)
    assert policy is not None  # no limit on changed lines
    return policy


@dataclass(frozen=True, slots=True)
class RowSplice:
    """How a policy's rows derive from revision ``base``'s, for readers of both that want
    to update, not redo, what they derived from the base (engine analysis, counts).

    ``rows[head:head + added]`` replace ``base.rows[head:head + removed]``; the rows
    before are the base's, the rows after are the base's moved ``shift`` lines down. Base
    rows on lines up to ``start_line`` are the head; those past ``old_end_line`` the tail.
    """

    base: str
    head: int
    removed: int
    added: int
    start_line: int
    old_end_line: int
    shift: int
    #: The types of the removed rows (``base.rows[head:head + removed]``), for counts.
    dropped: tuple[str, ...] = ()


class PolicyReader:
    """Reads policy directories, parsing only the lines that changed since its last read.

    A reload after a one-line edit of a 10,000-row ``policy.csv`` re-parsed and
    re-validated every row (~50-90 ms of CPU); even decoding and splitting the whole file
    costs ~2 ms. Here the new bytes are compared with the last read's (a few C-level
    comparisons), only the lines between the unchanged prefix and suffix are decoded,
    parsed and validated, and the rows around them are the previous read's (those after
    renumbered). The resulting policy says so in ``splice``. The model must be the same
    text, and a file with carriage returns is read whole (universal newlines change
    lengths). Not thread-safe: one reader per reloader (reloads are serialised).
    """

    def __init__(self) -> None:
        self._model_text: str | None = None
        self._raw: bytes = b""
        self._policy: Policy | None = None
        self._pending: tuple[str, bytes, str] | None = None
        #: Lines parsed by the last read (all of them for a full read), for tests.
        self.last_parsed = 0

    def read(
        self,
        directory: str | Path,
        *,
        max_changed: int | None = None,
        given: PolicyBytes | None = None,
    ) -> Policy | None:
        """The directory's policy; None (nothing parsed) if more than ``max_changed``
        lines differ from the last read, so the caller can parse it elsewhere. ``given``:
        the directory's files as the caller already read them (not read again)."""
        d = Path(directory)
        model_text, raw = _given_texts(given) if given is not None else (None, b"")
        if model_text is None:
            model_text, raw = _read_raw(d)
            given = None
        breathe()
        prev = self._policy
        span = None
        if prev is not None and model_text == self._model_text and b"\r" not in raw:
            span = _byte_span(self._raw, raw)
        if span is None:
            # A first read is always done here: it is what later reads diff against.
            text = _decode(raw)
            breathe()
            mid = text.split("\n")
            if prev is not None and max_changed is not None and len(mid) > max_changed:
                return self._unparsed(model_text, raw, text)
            revision = revision_of(model_text, text)
            rows, lines = parse_policy_rows(mid)
            fresh: range = range(len(rows))
            splice = None
            self.last_parsed = len(mid)
        else:
            old_end, start, stop, a, b = span
            if max_changed is not None and stop - start > max_changed:
                return self._unparsed(model_text, raw, None)
            mid = _decode(raw[a:b], first_line=start + 1).split("\n") if stop > start else []
            if given is not None and b"\r" not in given.model:  # hashed as read
                revision = given.digest[:16]
            else:
                revision = _revision(model_text.encode(), raw)
            assert prev is not None
            rows, lines, fresh, splice = _splice(prev, mid, old_end, start, stop)
            self.last_parsed = len(mid)
        breathe()
        policy = Policy(
            model_text=model_text,
            rows=rows,
            revision=revision,
            source=str(d),
            lines=lines,
            splice=splice,
        )
        validate_policy(policy, only=fresh)
        self._model_text, self._raw, self._policy = model_text, raw, policy
        self._pending = None
        return policy

    def _unparsed(self, model_text: str, raw: bytes, text: str | None) -> None:
        rev = _revision(model_text.encode(), raw) if text is None else revision_of(model_text, text)
        self._pending = (model_text, raw, rev)

    def adopt(self, policy: Policy) -> None:
        """Take ``policy``, parsed elsewhere from the texts the last ``read`` declined, as
        the base the next read diffs against."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[2] == policy.revision:
            self._model_text, self._raw, self._policy = pending[0], pending[1], policy


def _splice(
    prev: Policy, mid: list[str], old_end: int, start: int, stop: int
) -> tuple[tuple[tuple[str, ...], ...], tuple[int, ...], range, RowSplice]:
    """Rows and lines of the new revision: ``mid`` (lines ``start+1..stop``) parsed, the
    rest ``prev``'s; the indexes of the parsed rows (the ones left to validate)."""
    mid_rows, mid_lines = parse_policy_rows(mid, first_line=start + 1)
    head = bisect.bisect_right(prev.lines, start)  # rows on lines 1..start
    tail = bisect.bisect_right(prev.lines, old_end)  # rows after the old span
    shift = stop - old_end
    rows = prev.rows[:head] + mid_rows + prev.rows[tail:]
    after = prev.lines[tail:]
    lines = prev.lines[:head] + mid_lines + (tuple(n + shift for n in after) if shift else after)
    splice = RowSplice(
        base=prev.revision,
        head=head,
        removed=tail - head,
        added=len(mid_rows),
        start_line=start,
        old_end_line=old_end,
        shift=shift,
        dropped=tuple(row[0] for row in prev.rows[head:tail]),
    )
    return rows, lines, range(head, head + len(mid_rows)), splice


def _byte_span(old: bytes, new: bytes) -> tuple[int, int, int, int, int]:
    """The changed lines of ``new`` (split on ``\\n``) against ``old``: (end of the span in
    ``old``'s lines, its start and end in ``new``'s lines, and the byte range of those
    ``new`` lines without their last newline). Newlines are counted only before and in
    the span (counting a megabyte costs ~0.7 ms)."""
    if old == new:
        return 0, 0, 0, 0, 0  # no lines changed: every row is the tail, unmoved
    # The span starts at the line holding the first differing byte...
    a = new.rfind(b"\n", 0, _common_run(old, new, min(len(old), len(new)), 1)) + 1
    start = new.count(b"\n", 0, a)
    # ...and ends where whole lines of the common suffix begin: a line start in both
    # files (the suffix found is only limited not to reach back past ``a``).
    s = _common_run(old, new, min(len(old), len(new)) - a, -1)
    q, q_old = len(new) - s, len(old) - s
    if not ((q == 0 or new[q - 1] == _NL) and (q_old == 0 or old[q_old - 1] == _NL)):
        nl = new.find(b"\n", q)  # in the suffix: the next line starts in both
        q, q_old = (nl + 1, nl + 1 + len(old) - len(new)) if nl >= 0 else (-1, -1)
    if q >= 0:
        stop, old_end = start + new.count(b"\n", a, q), start + old.count(b"\n", a, q_old)
        return old_end, start, stop, a, max(a, q - 1)
    # No line of the suffix starts in it: the span runs to the end of both files.
    stop, old_end = start + new.count(b"\n", a) + 1, start + old.count(b"\n", a) + 1
    return old_end, start, stop, a, len(new)


_NL = ord("\n")


def common_affixes(a: Sequence[object], b: Sequence[object]) -> tuple[int, int]:
    """Lengths of the longest common prefix and of the longest common suffix of ``a`` and
    ``b`` that do not overlap. Compared by slices of doubling, then halving, size (a few
    C-level comparisons), so two 10,000-line revisions, or two megabytes of bytes,
    differing in one place cost well under a millisecond, not a Python loop."""
    lim = min(len(a), len(b))
    p = _common_run(a, b, lim, 1)
    s = _common_run(a, b, lim - p, -1)
    return p, s


def _common_run(a: Sequence[object], b: Sequence[object], lim: int, step: int) -> int:
    """How many items match from the front (step 1) or the back (step -1), at most lim."""
    na, nb = len(a), len(b)

    def same(n: int, size: int) -> bool:
        if n + size > lim:
            return False
        if step == 1:
            return a[n : n + size] == b[n : n + size]
        return a[na - n - size : na - n] == b[nb - n - size : nb - n]

    n, size = 0, 16
    while same(n, size):  # gallop: the first mismatch is within the next ``size``...
        n += size
        size *= 2
    while size > 1:  # ...then halve towards it (binary search)
        size //= 2
        if same(n, size):
            n += size
    return n


def policy_shape(model_text: str) -> dict[str, int]:
    """Number of values each ptype (``r``, ``p``, ``g``, ...) takes in the model.

    Uses pycasbin's own config reader so the model means here what it means to the
    engine; raises ``PolicyError`` naming ``model.conf`` when it does not parse.
    """
    return dict(_model_facts(model_text)[0])


@functools.lru_cache(maxsize=8)
def _model_facts(
    model_text: str,
) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
    """(values per ptype, eft column per policy type) of a model text. Memoised: every
    reload validates its new rows against the model, which rarely changes, and parsing
    it twice with pycasbin's config reader cost more than the rows."""
    try:
        from casbin.config import Config

        cfg = Config.new_config_from_text(model_text)
    except Exception as exc:  # pycasbin raises bare exceptions of many kinds
        raise PolicyError(f"model does not parse: {exc}", file=MODEL_FILE) from exc
    data: dict[str, dict[str, str]] = getattr(cfg, "_data", {})
    shape: dict[str, int] = {}
    for section in ("request_definition", "policy_definition", "role_definition"):
        for key, value in data.get(section, {}).items():
            shape[key] = len([v for v in value.split(",") if v.strip()])
    eft: dict[str, int] = {}
    for key, value in data.get("policy_definition", {}).items():
        names = [v.strip() for v in value.split(",")]
        if "eft" in names:
            eft[key] = names.index("eft")
    return tuple(shape.items()), tuple(eft.items())


def validate_policy(policy: Policy, *, only: range | None = None) -> None:
    """Refuse, with file and line, what would otherwise decide wrongly or fail per request.

    A request definition of other than four values cannot be called with the fixed
    ``(sub, dom, obj, act)`` contract; a row of an unknown type or with the wrong number
    of values would be silently ignored or mis-aligned by pycasbin; an effect column
    other than allow/deny is neither and so would never count. ``only``: the indexes of
    the rows to check (the others passed against the same model before).
    """
    shape = policy_shape(policy.model_text)
    r = shape.get("r")
    if r is None:
        raise PolicyError("model has no request definition 'r'", file=MODEL_FILE)
    if r != REQUEST_ARITY:
        raise PolicyError(
            f"model's request definition takes {r} values; citadel calls it with exactly "
            f"{REQUEST_ARITY}: r = sub, dom, obj, act",
            file=MODEL_FILE,
        )
    if "p" not in shape:
        raise PolicyError("model has no policy definition 'p'", file=MODEL_FILE)
    eft_index = dict(_model_facts(policy.model_text)[1])
    lines = policy.lines or (None,) * len(policy.rows)
    for i in range(len(policy.rows)) if only is None else only:
        row, line = policy.rows[i], lines[i]
        ptype, values = row[0], row[1:]
        want = shape.get(ptype) if ptype != "r" else None
        if want is None:
            known = ", ".join(sorted(k for k in shape if k != "r"))
            raise PolicyError(
                f"unknown policy type {ptype!r} (the model defines {known})",
                file=POLICY_FILE,
                line=line,
            )
        if len(values) != want:
            raise PolicyError(
                f"{ptype!r} row has {len(values)} values; the model defines {want}",
                file=POLICY_FILE,
                line=line,
            )
        idx = eft_index.get(ptype)
        if idx is not None and values[idx] not in ("allow", "deny"):
            raise PolicyError(
                f"effect must be 'allow' or 'deny', not {values[idx]!r}",
                file=POLICY_FILE,
                line=line,
            )


def rule_counts(policy: Policy) -> dict[str, int]:
    """Rows per ptype, for the status endpoint."""
    return dict(collections.Counter(map(operator.itemgetter(0), policy.rows)))
