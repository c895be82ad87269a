"""A policy as an immutable value: the Casbin model text, its rows, and a revision hash.

The revision is a content hash of the model and policy files, so every decision's audit
record can name exactly which rules decided it, and replicas that loaded the same files
agree on the name.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from citadel.errors import PolicyError

__all__ = ["MODEL_FILE", "POLICY_FILE", "Policy", "load_policy_dir", "parse_policy_rows"]

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
    h = hashlib.sha256()
    for part in (model_text, policy_text):
        data = part.encode()
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


def parse_policy_rows(
    text: str, *, file: str = POLICY_FILE
) -> tuple[tuple[tuple[str, ...], ...], tuple[int, ...]]:
    """Parse Casbin CSV policy lines the way Casbin's ``load_policy_line`` does."""
    rows: list[tuple[str, ...]] = []
    lines: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            fields = next(csv.reader(io.StringIO(stripped), skipinitialspace=True))
        except (csv.Error, StopIteration) as exc:
            raise PolicyError(f"malformed policy row: {exc}", file=file, line=lineno) from exc
        fields = [f.strip() for f in fields]
        if len(fields) < 2 or not fields[0]:
            raise PolicyError(
                "policy row needs a type and at least one value", file=file, line=lineno
            )
        rows.append(tuple(fields))
        lines.append(lineno)
    return tuple(rows), tuple(lines)


def load_policy_dir(directory: str | Path) -> Policy:
    """Read ``model.conf`` and ``policy.csv`` (through symlinks, as a mounted ConfigMap has)."""
    d = Path(directory)
    try:
        model_text = (d / MODEL_FILE).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise PolicyError(f"{MODEL_FILE} is missing in {d}", file=MODEL_FILE) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read {MODEL_FILE}: {exc}", file=MODEL_FILE) from exc
    try:
        policy_text = (d / POLICY_FILE).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise PolicyError(f"{POLICY_FILE} is missing in {d}", file=POLICY_FILE) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read {POLICY_FILE}: {exc}", file=POLICY_FILE) from exc
    rows, lines = parse_policy_rows(policy_text)
    return Policy(
        model_text=model_text,
        rows=rows,
        revision=revision_of(model_text, policy_text),
        source=str(d),
        lines=lines,
    )
