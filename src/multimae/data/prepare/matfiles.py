"""Reading MATLAB files: v7.3 (HDF5, through h5py) and v5 (through scipy.io), with one clear error
naming the file for the wrong version or a missing key. h5py and scipy come with the
``datasets`` extra (``pip install -e '.[datasets]'``) and are imported only here, lazily."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from multimae.data.errors import DataError

EXTRA = "pip install -e '.[datasets]' (make setup installs it)"


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading MATLAB files needs {module.split('.')[0]}: {EXTRA}") from None


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def mat_version(path: Path) -> str:
    """'5', '7.3', or '' from the 128-byte text header of a .mat file (an HDF5 file is '7.3')."""
    try:
        with open(path, "rb") as f:
            head = f.read(520)
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if head.startswith(b"MATLAB 7.3") or head.startswith(HDF5_SIGNATURE) or head[512:520] == HDF5_SIGNATURE:
        return "7.3"
    if head.startswith(b"MATLAB"):  # "MATLAB 5.0 MAT-file" and later v5-format versions
        return "5"
    return ""


def open_h5(path: Path, expected: str) -> Any:
    """An open h5py File of a v7.3 .mat; DataError naming ``path`` otherwise (``expected``: what it should be)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found (expected the v7.3 (HDF5) {expected})")
    h5py = _need("h5py")
    try:
        return h5py.File(path, "r")
    except OSError:
        version = mat_version(path)
        what = "a MATLAB v5 file" if version == "5" else "not an HDF5 file"
        raise DataError(f"{path}: is {what}; expected the v7.3 (HDF5) {expected}") from None


def load_v5(path: Path, expected: str, keys: tuple[str, ...], **kw: Any) -> dict:
    """``scipy.io.loadmat`` of a v5 .mat, checked to hold ``keys``; DataError naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found (expected {expected})")
    sio = _need("scipy.io")
    if mat_version(path) == "7.3":
        raise DataError(f"{path}: is a MATLAB v7.3 (HDF5) file; expected the v5 {expected}")
    try:
        mat = sio.loadmat(path, **kw)
    except NotImplementedError:  # scipy: "Please use HDF reader for matlab v7.3 files"
        raise DataError(f"{path}: is a MATLAB v7.3 (HDF5) file; expected the v5 {expected}") from None
    except (ValueError, OSError, TypeError) as e:
        raise DataError(f"{path}: not a readable MATLAB v5 file, expected {expected} ({e})") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: no {missing[0]!r} variable (has {found}); expected {expected}")
    return mat
