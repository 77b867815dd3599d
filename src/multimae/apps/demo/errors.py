"""The demo's one error type, and how its messages quote what the client sent."""
from __future__ import annotations

ECHO_CHARS = 200  # a message quotes at most this much of a client's value
MAX_MESSAGE_CHARS = 1000  # and is never longer than this


class DemoError(ValueError):
    """A request the demo cannot serve; ``status`` is the HTTP status (4xx) to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def short(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (a 500 KB id is not echoed back whole)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters)"


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message cut to ``limit`` characters."""
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message)} characters)"
