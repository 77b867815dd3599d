"""The demo's one error type."""
from __future__ import annotations


class DemoError(ValueError):
    """A request the demo cannot serve; ``status`` is the HTTP status (4xx) to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
