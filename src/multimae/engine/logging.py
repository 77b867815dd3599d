"""Run logging: JSON-lines metrics, TensorBoard and Weights & Biases (:class:`RunLogger`) and a
progress display.

``metrics.jsonl`` is always written; ``train.loggers`` adds ``tensorboard`` (the default) and / or
``wandb`` (the optional extra ``pip install 'multimae[wandb]'``): the same scalars at the same steps,
and the run's project (``train.wandb_project``), name (``train.run_name``) and whole config. The W&B
run's id is kept in ``run_dir/wandb-id``, so a resumed run continues the same W&B run; W&B's
environment variables (``WANDB_MODE=offline``, ``WANDB_DIR``, ``WANDB_API_KEY``, ...) apply as usual,
and its files go under the run directory unless ``WANDB_DIR`` says otherwise.

Only rank 0 should log: construct with ``enabled=is_main()`` and every call on other ranks
is a no-op.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = ["RunLogger", "Progress", "WandbSettings", "LOGGERS", "METRICS_FILE", "TENSORBOARD_DIR", "WANDB_ID_FILE"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
WANDB_ID_FILE = "wandb-id"
LOGGERS = ("tensorboard", "wandb")  # metrics.jsonl is always written
_RESERVED = ("step", "time")


def _scalar(key: str, value: Any) -> float | int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"log_scalars: '{key}' has shape {tuple(value.shape)}, not a scalar")
        value = value.detach().item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"log_scalars: '{key}' must be a number, got {type(value).__name__}")
    return value


class _Closing:
    """``with obj:`` closes ``obj`` at the end."""

    def __enter__(self):  # noqa: ANN204 - the subclass
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class WandbSettings:
    """What a W&B run is told: ``project``, ``entity`` (None: the account's default), ``name``
    (the run name shown) and ``config`` (the run's whole config, a JSON-able dict)."""

    project: str = "multimae"
    entity: str | None = None
    name: str | None = None
    config: Mapping[str, Any] | None = None


def check_loggers(loggers: Sequence[str]) -> None:
    """A one-line ``ValueError`` for an unknown name in ``train.loggers``, or ``wandb`` without the
    package installed."""
    unknown = [n for n in loggers if n not in LOGGERS]
    if unknown:
        raise ValueError(f"train.loggers: unknown {unknown}; choose from {list(LOGGERS)} "
                         f"({METRICS_FILE} is always written)")
    if "wandb" in loggers and importlib.util.find_spec("wandb") is None:
        raise ValueError("train.loggers includes wandb but the wandb package is not installed: "
                         "pip install 'multimae[wandb]' (or drop wandb from train.loggers)")


class RunLogger(_Closing):
    """Append scalar metrics to ``run_dir/metrics.jsonl`` and mirror them to TensorBoard and / or
    Weights & Biases.

    Each :meth:`log_scalars` call writes one flushed line ``{"step", "time", <name>: value}``.
    TensorBoard (``run_dir/tb``) is opened lazily; if it cannot be imported a warning is
    issued once and only the JSON lines are written. W&B (``wandb`` in ``loggers``) starts at the
    first call (``wandb`` settings: :class:`WandbSettings`). Usable as a context manager.
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], enabled: bool = True, tensorboard: bool = True,
        purge_step: int | None = None,
        loggers: Sequence[str] | None = None, wandb: WandbSettings | None = None,
    ) -> None:
        """``loggers`` (``train.loggers``) overrides ``tensorboard`` when given."""
        self.run_dir = Path(run_dir)
        self.purge_step = purge_step  # TensorBoard hides this run's events from this step on (a resume)
        self.enabled = enabled
        if loggers is not None:
            check_loggers(loggers)
            tensorboard = "tensorboard" in loggers
        self.tensorboard = tensorboard
        self.wandb = (wandb or WandbSettings()) if loggers is not None and "wandb" in loggers else None
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._tb_failed = False
        self._wandb_run: Any = None

    def _wb(self) -> Any:
        """The W&B run (started on first use; ``None`` when W&B is off or on other ranks)."""
        if self.wandb is None or not self.enabled:
            return None
        if self._wandb_run is None:
            import wandb

            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file = self.run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            if not run_id:
                run_id = uuid.uuid4().hex[:12]  # W&B ids: lower-case letters and digits
                from multimae.core.io import save_file_atomic

                save_file_atomic(id_file, lambda tmp: tmp.write_text(run_id + "\n"))
            w = self.wandb
            self._wandb_run = wandb.init(
                project=w.project, entity=w.entity, name=w.name, id=run_id, resume="allow",
                config=dict(w.config) if w.config is not None else None,
                dir=os.environ.get("WANDB_DIR") or str(self.run_dir))  # read now: wandb caches its settings
        return self._wandb_run

    @property
    def metrics_path(self) -> Path:
        """``run_dir/metrics.jsonl``."""
        return self.run_dir / METRICS_FILE

    def _tb(self) -> Any:
        if not (self.tensorboard and self.enabled) or self._tb_failed:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                self._tb_failed = True
                warnings.warn(
                    f"TensorBoard logging disabled ({e}); metrics still go to {self.metrics_path}",
                    stacklevel=3,
                )
                return None
            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=self.purge_step)
        return self._writer

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Log ``{name: number or 1-element tensor}`` at ``step``.

        Non-finite values are written as JSON ``NaN`` / ``Infinity`` (readable by Python's json).
        """
        if not self.enabled:
            return
        clean = {}
        for k, v in values.items():
            if k in _RESERVED:
                raise ValueError(f"log_scalars: '{k}' is reserved; rename the metric")
            clean[str(k)] = _scalar(k, v)
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        record = {"step": int(step), "time": round(time.time(), 3), **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        writer = self._tb()
        if writer is not None:
            for k, v in clean.items():
                writer.add_scalar(k, v, int(step))
        run = self._wb()
        if run is not None:
            run.log(clean, step=int(step))

    def log_image(self, step: int, tag: str, image: torch.Tensor | np.ndarray) -> None:
        """Log one image to TensorBoard.

        Args:
            image: ``(C, H, W)`` with C in {1, 3, 4}, or ``(H, W)``; uint8 in [0, 255] or float
                in [0, 1] (clamped).
        """
        if not self.enabled:
            return
        img = torch.as_tensor(image).detach().cpu()
        if img.ndim == 2:
            img = img.unsqueeze(0)
        if img.ndim != 3 or img.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"log_image: '{tag}' must be (C, H, W) with C in 1/3/4, got {tuple(img.shape)}"
            )
        if img.dtype != torch.uint8:
            img = img.float().clamp(0, 1)
        writer = self._tb()
        if writer is not None:
            writer.add_image(tag, img.numpy(), int(step), dataformats="CHW")
        run = self._wb()
        if run is not None:
            import wandb

            hwc = img.permute(1, 2, 0).numpy()
            run.log({tag: wandb.Image(hwc if img.dtype == torch.uint8 else (hwc * 255).round().astype(np.uint8))},
                    step=int(step))

    def flush(self) -> None:
        """Flush the metrics file and TensorBoard events to disk."""
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the metrics file and the TensorBoard writer (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None



def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress(_Closing):
    """Training progress on stderr: a tqdm bar on a terminal, plain lines otherwise (CI, files).

    ``update(n, loss=..., lr=..., imgs=...)`` advances by ``n`` steps; ``imgs`` is the number of
    images processed in those steps (global batch x n) and drives the images/s figure. Without a
    TTY a line ``step 100/1000 | loss ... | lr ... | img/s ... | eta ...`` is printed every
    ``log_every`` steps and at the last step.
    """

    def __init__(
        self,
        total_steps: int,
        initial: int = 0,
        enabled: bool = True,
        log_every: int = 50,
        stream: IO[str] | None = None,
    ) -> None:
        self.total = int(total_steps)
        self.step = int(initial)
        self.enabled = enabled
        self.log_every = max(1, int(log_every))
        self.stream = stream if stream is not None else sys.stderr
        self._start = time.perf_counter()
        self._start_step = self.step
        self._win_time = self._start
        self._win_imgs = 0.0
        self._imgs_per_s: float | None = None
        self._bar: Any = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, initial=self.step, file=self.stream, unit="step",
                dynamic_ncols=True, smoothing=0.1,
            )

    @property
    def is_bar(self) -> bool:
        """True when drawing a tqdm bar (stream is a TTY), False for plain lines."""
        return self._bar is not None

    @property
    def images_per_sec(self) -> float | None:
        """Latest throughput estimate (``None`` before any ``imgs`` were reported)."""
        return self._imgs_per_s

    def _throughput(self, imgs: float | None, now: float) -> None:
        if imgs is None:
            return
        self._win_imgs += imgs
        dt = now - self._win_time
        if dt > 0 and (dt >= 1.0 or self._imgs_per_s is None):  # refresh over >= 1 s windows
            self._imgs_per_s = self._win_imgs / dt
            self._win_imgs, self._win_time = 0.0, now

    def update(
        self,
        n: int = 1,
        loss: float | None = None,
        lr: float | None = None,
        imgs: float | None = None,
    ) -> None:
        """Advance by ``n`` steps and show the latest ``loss``, ``lr`` and images/s."""
        prev = self.step
        self.step += n
        if not self.enabled:
            return
        now = time.perf_counter()
        self._throughput(imgs, now)
        fields = self._fields(loss, lr)
        if self._bar is not None:
            self._bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in fields), refresh=False)
            self._bar.update(n)
        elif self.step // self.log_every > prev // self.log_every or self.step >= self.total:
            print(self._line(fields, now), file=self.stream, flush=True)

    def _fields(self, loss: float | None, lr: float | None) -> list[tuple[str, str]]:
        out = []
        if loss is not None:
            out.append(("loss", f"{float(loss):.4f}"))
        if lr is not None:
            out.append(("lr", f"{float(lr):.2e}"))
        if self._imgs_per_s is not None:
            out.append(("img/s", f"{self._imgs_per_s:.1f}"))
        return out

    def _line(self, fields: list[tuple[str, str]], now: float) -> str:
        elapsed = now - self._start
        done = self.step - self._start_step
        eta = (self.total - self.step) * elapsed / done if done > 0 else float("inf")
        pct = 100.0 * self.step / self.total if self.total else 100.0
        parts = [f"step {self.step}/{self.total} ({pct:.1f}%)"]
        parts += [f"{k} {v}" for k, v in fields]
        parts += [f"elapsed {_fmt_duration(elapsed)}", f"eta {_fmt_duration(max(0.0, eta))}"]
        return " | ".join(parts)

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None



def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
