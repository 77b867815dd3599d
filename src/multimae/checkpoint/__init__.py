"""Checkpoints: atomic safetensors + JSON directories (:mod:`.io`) and weight converters."""

from multimae.checkpoint.io import (
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    load_meta,
    load_weights,
    read_train_state,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_file_atomic,
    step_dir_name,
)

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "capture_rng_state",
    "find_latest",
    "list_checkpoints",
    "load_checkpoint",
    "load_meta",
    "load_weights",
    "read_train_state",
    "resolve_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "save_file_atomic",
    "step_dir_name",
]
