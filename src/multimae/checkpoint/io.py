"""Checkpoint reading and writing: safetensors weights + weights-only train state + JSON meta.

Layout of one checkpoint (a directory)::

    RUN/checkpoints/step-000001234/
        model.safetensors   model weights (safetensors; never pickled)
        state.pt            optimizer / scheduler / RNG / data position / step ... (torch.save of
                            tensors, primitives, dicts and lists only; read with weights_only=True)
        meta.json           {"format_version", "step", "epoch", "config", "library_version",
                             "time", ...}

Writes are atomic (:mod:`multimae.core.io`): everything goes into ``.tmp-step-...-<pid>@<host>-<random>/`` beside the final
directory, every file is fsync'ed, and the directory is renamed into place. ``meta.json`` is written
last, so a directory without a parseable ``meta.json`` is never taken as a checkpoint. Old
checkpoints are pruned by renaming them out of sight first (``.old-...``), then deleting; leftovers
of a killed writer are removed by the next save once their writer process is gone. Files get the
mode the user's umask gives (0644 under the usual 022). A full disk is one line naming the path and
the free space (:class:`CheckpointError`); the previous checkpoint stays intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save_file as _st_save_file

from multimae.core.io import TMP_PREFIX as _TMP_PREFIX
from multimae.core.io import apply_umask, free_space, save_file_atomic, tmp_name, writer_gone
from multimae.core.io import disk_full as _disk_full
from multimae.core.io import fsync_dir as _fsync_dir
from multimae.core.io import fsync_file as _fsync_file

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "WEIGHTS_FILE",
    "STATE_FILE",
    "META_FILE",
    "step_dir_name",
    "save_file_atomic",
    "apply_umask",
    "tmp_name",
    "save_checkpoint",
    "load_checkpoint",
    "read_train_state",
    "load_weights",
    "load_meta",
    "find_latest",
    "list_checkpoints",
    "resolve_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
]

#: Version of the on-disk layout; readers refuse checkpoints with a newer version and upgrade
#: older ones on load (:func:`upgrade_weights`). 2: a fine-tuning (transfer) model's encoder is
#: saved under MultiMAE's names (``encoder.<i>``, ``input_adapters``, ``global_tokens``,
#: ``encoder_norm``), not 1's ``encoder.blocks.<i>`` / ``encoder.input_adapters`` / ... .
FORMAT_VERSION = 2

# A fine-tuning model's encoder names, format 1 -> 2 and back (each table the other's inverse).
_V1_TRANSFER_NAMES = ((re.compile(r"^encoder\.blocks\.(\d+)\."), r"encoder.\1."),
                      (re.compile(r"^encoder\.input_adapters\."), "input_adapters."),
                      (re.compile(r"^encoder\.global_tokens$"), "global_tokens"),
                      (re.compile(r"^encoder\.norm\."), "encoder_norm."))
_V2_TRANSFER_NAMES = ((re.compile(r"^encoder\.(\d+)\."), r"encoder.blocks.\1."),
                      (re.compile(r"^input_adapters\."), "encoder.input_adapters."),
                      (re.compile(r"^global_tokens$"), "encoder.global_tokens"),
                      (re.compile(r"^encoder_norm\."), "encoder.norm."))


def transfer_name(key: str, version: int) -> str:
    """A fine-tuning model's parameter name in format ``version`` (2: the current names, 1: the
    old encoder names), given its name in the other format; names outside the encoder stay."""
    for rx, to in _V1_TRANSFER_NAMES if version == 2 else _V2_TRANSFER_NAMES:
        if rx.match(key):
            return rx.sub(to, key, count=1)
    return key


def upgrade_weights(sd: Mapping[str, torch.Tensor], version: int | None = None) -> dict[str, torch.Tensor]:
    """Weights saved under format ``version`` in the current names (a new dict). ``None``: a bare
    weights file of unknown version, recognised by its names (version 1 fine-tuning weights, and
    only they, hold ``encoder.blocks.<i>.*``). Pretraining weights kept their names."""
    if (version is not None and version >= 2) or not any(k.startswith("encoder.blocks.") for k in sd):
        return dict(sd)
    return {transfer_name(k, 2): v for k, v in sd.items()}


WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINTS_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")
_OLD_PREFIX = ".old-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or from a newer format version."""


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint at ``step``, e.g. ``step-000001234``."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:09d}"


# --------------------------------------------------------------------------------------------
# Validation of what goes into state.pt
# --------------------------------------------------------------------------------------------

_PRIMITIVES = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_loadable(obj: Any, key: str) -> None:
    """Raise if ``obj`` would not load with ``torch.load(weights_only=True)``."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PRIMITIVES):
        return
    if isinstance(obj, Mapping):
        if not isinstance(obj, dict):
            raise CheckpointError(f"train_state{key}: use a plain dict, not {type(obj).__name__}")
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"train_state{key}: key {k!r} must be str or int")
            _check_loadable(v, f"{key}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{key}[{i}]")
        return
    raise CheckpointError(
        f"train_state{key}: {type(obj).__name__} cannot be loaded with weights_only=True; "
        "store tensors, numbers, strings, lists and dicts only"
    )


def _prepare_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no shared storage (safetensors refuses aliasing)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in state.items():
        if not isinstance(k, str):
            raise CheckpointError(f"model_state key {k!r} must be a string")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"model_state[{k!r}] is {type(t).__name__}, not a tensor")
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if not t.is_contiguous() or (ptr is not None and ptr in seen):
            t = t.contiguous().clone()
        if ptr is not None:
            seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _library_version() -> str:
    try:
        return metadata.version("multimae")
    except metadata.PackageNotFoundError:
        return "unknown"


def _checkpoints_root(run_dir: Path) -> Path:
    """``run_dir/checkpoints`` unless ``run_dir`` already is a checkpoints directory."""
    if run_dir.name == CHECKPOINTS_DIR or any(_STEP_RE.match(p.name) for p in _iterdir(run_dir)):
        return run_dir
    return run_dir / CHECKPOINTS_DIR


def _iterdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model_state: Mapping[str, torch.Tensor],
    train_state: dict,
    meta: dict,
    keep_last: int = 3,
    extra_dirs: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Atomically write the checkpoint ``run_dir/checkpoints/step-<step>/`` and prune old ones.

    Args:
        run_dir: the run directory (a ``checkpoints/`` directory is created inside).
        step: optimizer step count; names the directory.
        model_state: ``{name: tensor}`` weights (e.g. ``unwrap(model).state_dict()``); moved to
            CPU, made contiguous and de-aliased before writing.
        train_state: optimizer / scheduler / RNG / data position ...: tensors, numbers, strings,
            lists and dicts only, so it loads with ``weights_only=True`` (checked before writing).
        meta: JSON-serialisable extras; ``"config"`` (a dict) and ``"epoch"`` are expected.
            ``format_version``, ``step``, ``library_version`` and ``time`` are filled in.
        keep_last: keep this many newest checkpoints after a successful save (<= 0: keep all).
        extra_dirs: ``{name: directory}`` moved (renamed, same file system) into the checkpoint as
            ``name/`` before ``meta.json`` is written, e.g. the sharded train state of an FSDP run
            (:mod:`multimae.engine.parallel`).
    Returns:
        The final checkpoint directory.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _check_loadable(train_state, "")
    full_meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "epoch": meta.get("epoch", train_state.get("epoch")),
        "config": meta.get("config"),
        "library_version": _library_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "unix_time": time.time(),
    }
    try:
        json.dumps(full_meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint meta is not JSON-serialisable: {e}") from e
    weights = _prepare_weights(model_state)

    final = root / step_dir_name(step)
    tmp = root / tmp_name(final.name)
    tmp.mkdir()
    old = None
    try:
        _st_save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        torch.save(train_state, tmp / STATE_FILE)
        for name, src in (extra_dirs or {}).items():  # already written (and fsync'ed) by their owner
            if not Path(src).is_dir():
                raise CheckpointError(f"extra checkpoint directory {Path(src)} (for {name}/) does not exist")
            os.replace(src, tmp / name)
        # last: its presence marks the directory complete
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2) + "\n", encoding="utf-8")
        for name in (WEIGHTS_FILE, STATE_FILE, META_FILE):
            apply_umask(tmp / name)
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside, then swap
            old = root / tmp_name(final.name, _OLD_PREFIX)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old, final)
        if _disk_full(e):
            raise CheckpointError(f"disk full while writing {final} ({free_space(final)}); the previous checkpoint is "
                                  "intact. Free some space (or set train.keep_last lower) and run the same command "
                                  "again") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _cleanup_stale(root)
    if keep_last > 0:
        _prune(root, keep_last, protect=final)
    return final


_UNOWNED_STALE_S = 24 * 3600  # a temporary whose writer cannot be checked (another host) is stale after a day


def _cleanup_stale(root: Path) -> None:
    """Remove temp / aside directories left behind by a writer that is gone (one that is still
    running, e.g. another rank saving, keeps its own)."""
    for p in _iterdir(root):
        if not (p.is_dir() and (p.name.startswith(_TMP_PREFIX) or p.name.startswith(_OLD_PREFIX))):
            continue
        try:
            old = time.time() - p.stat().st_mtime > _UNOWNED_STALE_S
        except OSError:
            continue
        if writer_gone(p.name) or old:
            shutil.rmtree(p, ignore_errors=True)


def _prune(root: Path, keep_last: int, protect: Path) -> None:
    """Delete all but the ``keep_last`` newest checkpoints: each is renamed out of sight first, so a
    kill during the deletion leaves a ``.old-`` directory (removed later), never a broken ``step-``."""
    ckpts = list_checkpoints(root)
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        if p != protect:
            aside = root / tmp_name(p.name, _OLD_PREFIX)
            try:
                os.replace(p, aside)
            except OSError:
                continue
            shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Finding and loading
# --------------------------------------------------------------------------------------------


def _is_complete(step_dir: Path) -> bool:
    if not (step_dir / WEIGHTS_FILE).is_file() or not (step_dir / STATE_FILE).is_file():
        return False
    try:
        meta = json.loads((step_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "step" in meta


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint directories of a run (or of a ``checkpoints/`` dir), oldest first."""
    root = _checkpoints_root(Path(run_dir))
    found = []
    for p in _iterdir(root):
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and _is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_latest(run_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step, or ``None`` if the run has none."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Map a step directory, a ``checkpoints/`` directory or a run directory to a step directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path does not exist: {p}")
    if (p / META_FILE).exists() or (p / WEIGHTS_FILE).exists():
        return p
    latest = find_latest(p)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint found in {p}")
    return latest


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``meta.json`` of a checkpoint (step dir or run dir)."""
    d = resolve_checkpoint(path)
    f = d / META_FILE
    if not f.is_file():
        raise CheckpointError(f"checkpoint is incomplete, missing {f}")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint meta {f}: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"corrupt checkpoint meta {f}: expected a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"corrupt checkpoint meta {f}: no integer 'format_version'")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {d} has format version {version}, newer than the supported "
            f"{FORMAT_VERSION}; upgrade multimae to read it"
        )
    return meta


def _load_weights_file(f: Path, version: int | None = None) -> dict[str, torch.Tensor]:
    """The weights of ``f`` in the current names (:func:`upgrade_weights`; ``version`` from the
    checkpoint's ``meta.json``, None for a bare file)."""
    if not f.is_file():
        raise CheckpointError(f"checkpoint is incomplete, missing {f}")
    try:
        return upgrade_weights(_st_load_file(str(f), device="cpu"), version)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt weights file {f}: {e}") from e


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load only the weights: from a ``.safetensors`` file, a step dir or a run dir (latest)."""
    p = Path(path)
    if p.is_file():
        return _load_weights_file(p)
    d = resolve_checkpoint(p)
    meta = load_meta(d)  # refuse newer format versions before touching the weights
    return _load_weights_file(d / WEIGHTS_FILE, meta["format_version"])


def _read_state(d: Path, map_location: str | torch.device, weights: bool) -> tuple[dict, dict]:
    meta = load_meta(d)
    f = d / STATE_FILE
    for required in ((d / WEIGHTS_FILE,) if weights else ()) + (f,):
        if not required.is_file():
            raise CheckpointError(f"checkpoint is incomplete, missing {required}")
    try:
        train_state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors have many types
        raise CheckpointError(f"corrupt or unsafe train state {f}: {e}") from e
    if not isinstance(train_state, dict):
        raise CheckpointError(f"corrupt train state {f}: expected a dict")
    return train_state, meta


def read_train_state(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[dict, dict]:
    """``(train_state, meta)`` of a checkpoint (a step dir, or a run dir's latest) without reading its
    weights: an FSDP resume takes those from its shards. Errors as :func:`load_checkpoint`'s."""
    return _read_state(resolve_checkpoint(path), map_location, weights=False)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Load ``(weights, train_state, meta)`` from a step dir, or from a run dir's latest checkpoint.

    ``state.pt`` is read with ``torch.load(weights_only=True)``: no code is executed.
    Raises :class:`CheckpointError` naming the file for a missing, corrupt or too-new checkpoint.
    """
    d = resolve_checkpoint(path)
    train_state, meta = _read_state(d, map_location, weights=True)
    return _load_weights_file(d / WEIGHTS_FILE, meta["format_version"]), train_state, meta


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the torch (CPU and every CUDA device), numpy and python RNGs.

    The result holds only tensors, lists and numbers, so it survives ``weights_only`` loading.
    """
    np_state = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": str(np_state[0]),
            "state": [int(x) for x in np_state[1]],
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "state": list(py_state), "gauss_next": py_gauss},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNGs from :func:`capture_rng_state` output; absent entries are left alone.

    CUDA states are restored for as many devices as both the snapshot and this machine have.
    """
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), i)
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(
            (
                s["bit_generator"],
                np.asarray(s["state"], dtype=np.uint32),
                int(s["pos"]),
                int(s["has_gauss"]),
                float(s["cached_gaussian"]),
            )
        )
    if "python" in state:
        s = state["python"]
        random.setstate((int(s["version"]), tuple(int(x) for x in s["state"]), s["gauss_next"]))
