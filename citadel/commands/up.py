"""`citadel up` and `citadel demo`: the embedded default (issue: first run)."""

from __future__ import annotations
