"""Structured operational logs (structlog), separate from the audit trail.

Logs go to stderr so stdout stays free for audit records in a cluster. A redaction
processor drops any event key that could carry a credential, whatever the caller passed:
a token or key must never reach a log line even through a careless ``log.info(..., **kw)``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]

_SECRET_KEYS = frozenset(
    {"token", "authorization", "bearer", "key", "private_key", "password", "passphrase", "cookie"}
)


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for k in list(event):
        if k.lower() in _SECRET_KEYS:
            event[k] = "[redacted]"
    return event


def configure_logging(*, level: str = "info", json: bool | None = None) -> None:
    """Idempotent; JSON when stderr is not a terminal (i.e. in a cluster) unless told."""
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
