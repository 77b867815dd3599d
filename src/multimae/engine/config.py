"""The config components every task shares: the run (:class:`RunConfig`) and the optimizer and
schedule (:class:`OptimConfig`). A task's config holds them as its ``train`` and ``optim``
sections; a task that needs other defaults says so where it holds the section (e.g. fine-tuning's
``optim`` starts from ``base_lr=5e-4``, ``layer_decay=0.65``), and YAML / JSON keys left out of a
section keep those defaults (:func:`multimae.core.config.from_dict`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from multimae.core.config import upgrade_saved_config  # noqa: F401 (re-exported: saved run configs are upgraded below the engine)


@dataclass
class OptimConfig:
    """AdamW (optionally with layer-wise lr decay) under a linear warm-up + cosine schedule, per
    optimizer step."""

    base_lr: float = 1e-4  # lr = base_lr * global_batch / 256 (paper)
    lr: float | None = None  # absolute lr; overrides base_lr scaling when set
    min_lr: float = 0.0
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    warmup_lr: float = 1e-6  # lr of the first warm-up step, rising linearly to lr (official: 1e-6)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    layer_decay: float | None = None  # lr scale layer_decay ** (depth + 1 - layer); null: none
    decay_norm_bias: bool = False  # weight decay on LayerNorm weights and biases
    clip_grad: float | None = None
    accum_steps: int = 1
    implementation: Literal["auto", "fused", "foreach", "loop"] = "auto"  # AdamW kernels (auto: fused)

    def __post_init__(self) -> None:
        _check("optim", self, positive=("base_lr", "lr", "accum_steps"), non_negative=(
            "min_lr", "warmup_epochs", "warmup_steps", "warmup_lr", "weight_decay", "clip_grad"))
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay={self.layer_decay}: must be in (0, 1] (or null)")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)}: each must be in [0, 1)")


@dataclass
class RunConfig:
    """Length, batch, precision, seeding, run directory, checkpointing and logging of a run."""

    epochs: int = 1600
    max_steps: int | None = None  # stop early after this many optimizer steps (resume later)
    batch_size: int = 256  # per rank (per micro-batch)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager": trace only, no code generation)
    tune_malloc: bool = True  # keep freed memory in glibc's heap (multimae.core.perf.tune_malloc)
    seed: int = 0
    out_dir: str = "runs"
    run_name: str | None = "pretrain"
    resume: str | None = "auto"  # "auto": latest checkpoint of the run if any; a path; null
    ckpt_every: int = 500  # optimizer steps
    keep_last: int = 3
    log_every: int = 20
    # metrics.jsonl always; plus any of "tensorboard", "wandb" (pip install 'multimae[wandb]'; project /
    # entity below, the run name and the whole config logged; WANDB_MODE=offline etc. apply)
    loggers: tuple[Literal["tensorboard", "wandb"], ...] = ("tensorboard",)
    wandb_project: str = "multimae"
    wandb_entity: str | None = None
    device: str = "auto"
    # "ddp": every rank holds the whole model; "fsdp": FSDP2, parameters / gradients / optimizer state
    # sharded over the ranks, per transformer block (multimae.engine.parallel)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False  # recompute each transformer block in the backward pass
    # a NaN / infinite loss or gradient norm: "stop" the run naming the step (no update is saved),
    # or "skip" the update (one host read per step) and stop after nonfinite_max_skips in a row
    nonfinite: Literal["stop", "skip"] = "stop"
    nonfinite_max_skips: int = 10

    def __post_init__(self) -> None:
        _check("train", self, positive=("epochs", "batch_size", "ckpt_every", "log_every", "nonfinite_max_skips"),
               non_negative=("max_steps", "seed"))


def _check(section: str, cfg: object, positive: tuple[str, ...], non_negative: tuple[str, ...]) -> None:
    """One line naming the key of the first number out of range (None passes: "not set")."""
    for names, ok, want in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            v = getattr(cfg, name)
            if v is not None and not isinstance(v, bool) and isinstance(v, (int, float)) and not (ok(v) and v == v):
                raise ValueError(f"{section}.{name}={v}: must be {want}")
