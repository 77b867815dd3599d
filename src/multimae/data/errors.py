"""Data errors and the ``on_error`` policy shared by every dataset.

Every problem with input data raises :class:`DataError` whose message names the file path or the
sample key and says what is wrong. Datasets built with ``on_error="skip"`` instead drop the sample,
log a warning naming it, and count it in ``dataset.skipped``: nothing is dropped silently.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
from typing import Literal

OnError = Literal["raise", "skip"]
Missing = Literal["error", "skip", "allow"]

log = logging.getLogger("multimae.data")


_NOTICES: set[tuple[str, ...]] = set()


def notice_once(*what: str) -> None:
    """Log ``what[-1]`` as a warning once per process for the key ``what`` (datasets are opened
    for training and evaluation, and files decoded many times: one notice says it)."""
    if what not in _NOTICES:
        _NOTICES.add(what)
        log.warning(what[-1])


class DataError(ValueError):
    """Bad input data; the message names the file or sample key and what is wrong."""


class ImageTooLargeError(DataError):
    """An image whose header declares more pixels than the decoding limit (a decompression bomb):
    bad data like any other (skipped under ``on_error="skip"``), refused before decoding."""


def check_on_error(on_error: str) -> OnError:
    """Validate an ``on_error`` policy value."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return on_error  # type: ignore[return-value]


def check_missing(missing: str) -> Missing:
    """Validate a ``data.missing`` policy value (a sample lacking some modality)."""
    if missing not in ("error", "skip", "allow"):
        raise ValueError(f"data.missing must be 'error', 'skip' or 'allow', got {missing!r}")
    return missing  # type: ignore[return-value]


def coverage_lines(counts: dict[str, int], total: int) -> list[str]:
    """``key: n of total (p%)`` per modality: how many samples have it."""
    return [f"{k}: {n} of {total} ({100.0 * n / max(total, 1):.1f}%)" for k, n in counts.items()]


class SkipCounter:
    """Counts skipped samples across DataLoader worker processes.

    The count lives in shared memory, so the copy of a dataset inside a worker process adds to
    the number the main process reads. Pickling it outside process start-up (e.g. ``deepcopy``)
    keeps a plain snapshot of the count instead.
    """

    def __init__(self) -> None:
        self._value = multiprocessing.Value("q", 0)
        self._local = 0

    @property
    def value(self) -> int:
        return int(self._value.value) if self._value is not None else self._local

    def add(self, n: int = 1) -> None:
        if self._value is not None:
            with self._value.get_lock():
                self._value.value += n
        else:
            self._local += n

    def __getstate__(self) -> dict:
        if multiprocessing.context.get_spawning_popen() is not None:
            return {"_value": self._value, "_local": 0}
        return {"_value": None, "_local": self.value}


class ErrorPolicy:
    """Applies an ``on_error`` policy: raise the DataError, or warn + count + skip.

    It also counts the invalid pixels (NaN/inf in dense maps, set to 0) a dataset repaired, so
    that the run log can report them (``invalid_pixels``), summed over worker processes.
    """

    def __init__(self, on_error: str = "raise") -> None:
        self.on_error: OnError = check_on_error(on_error)
        self.counter = SkipCounter()
        self.invalid = SkipCounter()

    @property
    def skipped(self) -> int:
        return self.counter.value

    @property
    def invalid_pixels(self) -> int:
        """Non-finite dense values set to 0 (invalid pixels) so far."""
        return self.invalid.value

    def count_invalid(self, n: int) -> None:
        if n:
            self.invalid.add(n)

    def handle(self, err: DataError) -> None:
        """Re-raise ``err`` under ``raise``; otherwise log it and count one skipped sample."""
        if self.on_error == "raise":
            raise err
        self.counter.add(1)
        log.warning("skipping bad sample: %s", err)

    def summary(self, what: str = "dataset") -> str:
        """A one-line report, e.g. for the end of an epoch."""
        return f"{what}: {self.skipped} bad sample(s) skipped (on_error={self.on_error})"
