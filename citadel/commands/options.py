"""Options that several serve commands share, defined once so they mean the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["AuditSigningKey", "EventLoop"]

AuditSigningKey = Annotated[
    Path | None,
    typer.Option(
        "--audit-signing-key",
        help="Ed25519/EC key (citadel audit keygen) signing periodic audit checkpoints.",
    ),
]

EventLoop = Annotated[
    str,
    typer.Option(
        "--event-loop",
        help="auto (uvloop when installed), uvloop or asyncio: the loop grpc.aio runs on.",
    ),
]
