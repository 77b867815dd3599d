"""``benchmarks/reproduce.py``'s plan: the pretraining arms, the transfer tasks and their configs,
the report's columns, the compute budget, and the jobs (one per stage, arm, seed and task) in
priority order with their dependencies and config overrides. No torch, no training."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("multimae", "mae", "m3ae", "scratch")  # the default run
# M3AE text mask ratio ablation (M3AE paper: 50-90% text masking beats BERT's 15%); the M3AE arm
# above is the 75% point. Only run when named in --arms.
TEXT_MASK_ARMS = ("m3ae_t15", "m3ae_t50", "m3ae_t50_90")
ALL_ARMS = (*ARMS[:3], *TEXT_MASK_ARMS, ARMS[3])
ARM_LABEL = {"multimae": "MultiMAE", "mae": "MAE", "m3ae": "M3AE", "scratch": "scratch",
             "m3ae_t15": "M3AE text 15%", "m3ae_t50": "M3AE text 50%", "m3ae_t50_90": "M3AE text 50-90%"}
ARM_WHAT = {
    "multimae": "rgb + depth + semseg in and out, 32 of 192 tokens visible, Dirichlet(1) split",
    "mae": "rgb in, rgb out, 32 of 64 tokens visible (same code and config, one modality)",
    "m3ae": "rgb + caption in and out, M3AE recipe: mask ratio 0.75 each, one shared decoder, caption loss 0.5",
    "scratch": "no pretraining (random init, same transfer recipe)",
    "m3ae_t15": "the M3AE arm with a BERT-like text mask ratio of 0.15 (image 0.75)",
    "m3ae_t50": "the M3AE arm with a text mask ratio of 0.5 (image 0.75)",
    "m3ae_t50_90": "the M3AE arm with a text mask ratio drawn per sample uniformly from [0.5, 0.9] (the paper's "
                   "good range; image 0.75)",
}
PRETRAIN = {  # arm -> (config, overrides)
    "multimae": ("configs/pretrain/synthetic-tiny.yaml", []),
    "mae": ("configs/pretrain/synthetic-tiny.yaml", ["model.inputs=[rgb]", "model.outputs=[rgb]"]),
    "m3ae": ("configs/pretrain/synthetic-m3ae-tiny.yaml", []),
    "m3ae_t15": ("configs/pretrain/synthetic-m3ae-tiny.yaml", ["mask.ratios={rgb: 0.75, caption: 0.15}"]),
    "m3ae_t50": ("configs/pretrain/synthetic-m3ae-tiny.yaml", ["mask.ratios={rgb: 0.75, caption: 0.5}"]),
    "m3ae_t50_90": ("configs/pretrain/synthetic-m3ae-tiny.yaml", ["mask.ratios={rgb: 0.75, caption: [0.5, 0.9]}"]),
}
# task -> (config, overrides, kind); kind: finetune | probe | ood | caption
PROBE_CFG = "configs/finetune/synthetic-probe.yaml"
TASKS = {
    "depth_rgb": ("configs/finetune/synthetic-depth.yaml", ["model.inputs=[rgb]", "model.head.main_tasks=[rgb]"], "finetune"),
    "seg_rgbd": ("configs/finetune/synthetic-semseg.yaml", ["model.inputs=[rgb,depth]", "model.head.main_tasks=[rgb]"], "finetune"),
    "seg_rgb": ("configs/finetune/synthetic-semseg.yaml", ["model.inputs=[rgb]", "model.head.main_tasks=[rgb]"], "finetune"),
    "seg_d": ("configs/finetune/synthetic-semseg.yaml", ["model.inputs=[depth]", "model.head.main_tasks=[depth]"], "finetune"),
    # RGB-D input with the head reading the rgb AND the depth tokens (concatenated on channels)
    "seg_rgbd_head2": ("configs/finetune/synthetic-semseg.yaml", ["model.inputs=[rgb,depth]",
                       "model.head.main_tasks=[rgb,depth]"], "finetune"),
    # classification: the config's own recipe (4096 scenes, batch 32, 3 epochs = 384 steps, crops of
    # >= 80% of the area, no RandAugment): the short recipe the first runs pinned (1024 scenes, 128
    # steps, RandAugment, 35-100% crops) left every arm at the majority class
    "cls": ("configs/finetune/synthetic-cls.yaml", ["model.inputs=[rgb]"], "finetune"),
    "probe_rgb": (PROBE_CFG, ["model.inputs=[rgb]"], "probe"),
    "ood_rgb": (PROBE_CFG, ["model.inputs=[rgb]"], "ood"),
    # probes of caption-named attributes (synthetic.scene_attributes) on the same frozen features
    "probe_colour": (PROBE_CFG, ["model.inputs=[rgb]", "model.head.num_classes=8"], "probe"),
    "probe_count": (PROBE_CFG, ["model.inputs=[rgb]", "model.head.num_classes=7"], "probe"),
    "probe_position": (PROBE_CFG, ["model.inputs=[rgb]", "model.head.num_classes=3"], "probe"),
    "ood_type2": (PROBE_CFG, ["model.inputs=[rgb]"], "ood"),
    "ood_colour": (PROBE_CFG, ["model.inputs=[rgb]"], "ood"),
    # M3AE only: the caption words predicted from the image alone (benchmarks/m3ae_caption.py's metric)
    "caption": ("", [], "caption"),
}
# probe / OOD task -> (attribute of synthetic.ATTRIBUTE_CLASSES, in-distribution classes, OOD classes)
PROBE_ATTR: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "probe_rgb": ("type", (), ()),
    "probe_colour": ("colour", (), ()),
    "probe_count": ("count", (), ()),
    "probe_position": ("position", (), ()),
    "ood_rgb": ("type", ("box", "cone", "cylinder"), ("sphere",)),
    "ood_type2": ("type", ("box", "cone"), ("cylinder", "sphere")),
    "ood_colour": ("colour", ("red", "yellow", "green", "blue", "pink"), ("orange", "cyan", "purple")),
}
# (task, metric, header, higher is better)
COLUMNS = [
    ("seg_rgb", "miou", "semseg RGB mIoU", True),
    ("seg_d", "miou", "semseg D mIoU", True),
    ("seg_rgbd", "miou", "semseg RGB-D mIoU", True),
    ("seg_rgbd_head2", "miou", "semseg RGB-D mIoU (head on rgb+depth)", True),
    ("depth_rgb", "delta1", "depth δ1", True),
    ("depth_rgb", "absrel", "depth AbsRel", False),
    ("cls", "top1", "cls top-1 (FT)", True),
    ("probe_rgb", "top1", "probe top-1", True),
    ("probe_colour", "top1", "probe colour top-1", True),
    ("probe_count", "top1", "probe count top-1", True),
    ("probe_position", "top1", "probe position top-1", True),
    ("ood_rgb", "auroc", "OOD AUROC (MSP)", True),
    ("ood_type2", "auroc", "OOD types AUROC", True),
    ("ood_colour", "auroc", "OOD colours AUROC", True),
    ("caption", "colour_acc", "caption colour acc", True),
    ("caption", "type_acc", "caption type acc", True),
    ("caption", "colour_recall", "caption colour recall", True),
    ("caption", "type_recall", "caption type recall", True),
]
PROBE_TEXT = {"type": "type of the largest visible object (4 classes, the scene label)",
              "colour": "colour of the largest visible object (8 classes)",
              "count": "number of objects the caption describes (classes 0-6)",
              "position": "image third (left / middle / right) of the largest visible object"}
CAPTION_ARMS = ("m3ae", *TEXT_MASK_ARMS)  # arms whose pretraining predicts captions
DEFAULT_TASKS = ("depth_rgb", "seg_rgbd", "seg_rgb", "seg_d", "cls", "probe_rgb", "ood_rgb")
DOWNSTREAM_KEYS = ("rgb", "depth", "semseg", "label")


@dataclass
class Budget:
    seeds: int = 3
    pretrain_steps: int = 200  # every arm
    pretrain_batch: int = 32
    pretrain_scenes: int = 1600  # scenes per pretraining epoch (rendered once per run, data.cache)
    pretrain_warmup: int = 20
    ft_batch: int = 16
    ft_train_scenes: int = 1024
    ft_epochs: int = 1  # -> 64 optimizer steps at batch 16 (semseg, depth)
    ft_warmup: int = 10  # warm-up steps of the semseg / depth fine-tunes (their configs say 1 epoch)
    test_scenes: int = 384
    probe_epochs: int = 100
    cls_own_recipe: bool = True  # classification: the config's recipe as is (False: ft_* sizes, 1 epoch)
    ckpt_every: int = 50
    arms: tuple[str, ...] = ARMS  # --arms: a subset (an investigation run)
    tasks: tuple[str, ...] = DEFAULT_TASKS  # --tasks: a subset, or further tasks of TASKS

    @property
    def pretrain_epochs(self) -> int:
        return max(1, self.pretrain_steps // (self.pretrain_scenes // self.pretrain_batch))

    @property
    def ft_steps(self) -> int:
        return self.ft_epochs * (self.ft_train_scenes // self.ft_batch)


FULL = Budget()
QUICK = Budget(seeds=1, pretrain_steps=2, pretrain_batch=8, pretrain_scenes=16, pretrain_warmup=1, ft_batch=8,
               ft_train_scenes=16, ft_epochs=1, ft_warmup=1, test_scenes=16, probe_epochs=2, cls_own_recipe=False,
               ckpt_every=50)

BUDGET_REASON = """\
Measured on this machine before choosing (2-vCPU AMD EPYC, one torch thread per process, two of
our processes running beside another engineer's two benchmark processes, i.e. about half a core
each): pretraining at batch 32 took ~1.2 s/step for MultiMAE (32 visible tokens, 3 decoders) and
~1.0 s/step for M3AE (40-step runs, plus ~25 s of start-up and scene rendering); fine-tuning steps
at batch 32 took 1.65 s (semseg from rgb), 2.4 s (semseg from rgb + depth), 2.6 s (depth, DPT
head) and 0.9 s (classification), and half that at batch 16 (the cost is per sample); rendering
a 64 px scene costs 3.6 ms, so the library's in-memory `data.cache` is enough (no scenes on disk;
each worker process renders the downstream splits once and shares them between its jobs). That is
~0.29 s per training sample summed over the five fine-tunes of one (arm, seed). 9 pretraining runs
+ 84 transfer jobs (7 tasks x 4 arms x 3 seeds) within ~55 min on two workers (~6500
worker-seconds at that load) leave 200 pretraining steps per arm (batch 32, 6400 samples) and one
epoch of the 1024 downstream training scenes per dense fine-tune (64 steps at batch 16, 10 warm-up
steps), and 2 epochs (128 steps) for classification. This is a tiny budget: the quick start
pretrains 768 steps, the paper 1600 ImageNet epochs; absolute numbers are far from converged, and
the comparison is between arms at equal (small) compute."""



# ----------------------------------------------------------------------------------------- jobs

@dataclass
class Job:
    stage: str  # pretrain | transfer
    arm: str
    seed: int
    task: str = ""  # transfer task
    deps: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"pretrain/{self.arm}-s{self.seed}" if self.stage == "pretrain" else \
            f"transfer/{self.task}/{self.arm}-s{self.seed}"


def run_dir_of(out: Path, job: Job) -> Path:
    return out / job.name


def result_file(out: Path, job: Job) -> Path:
    d = run_dir_of(out, job)
    if job.stage == "pretrain":
        return d / "pretrain_done.json"
    kind = TASKS[job.task][2]
    return d / {"ood": "ood.json", "caption": "caption.json"}.get(kind, "eval.json")


def build_jobs(budget: Budget, plan: list[tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...] | None]] | None
               = None) -> list[Job]:
    """Priority order: stage by stage of ``plan`` ((arms, tasks, seeds or None = all) triples,
    default one stage of every arm, task and seed), within a stage seed by seed (so an early stop leaves whole seeds),
    pretraining first, then the transfer jobs of that seed, longest first. A job listed by an
    earlier stage is not repeated."""
    jobs: list[Job] = []
    seen: set[str] = set()

    def add(job: Job) -> None:
        if job.name not in seen:
            seen.add(job.name)
            jobs.append(job)

    for arms, tasks, seeds in plan or [(budget.arms, budget.tasks, None)]:
        for seed in (range(budget.seeds) if seeds is None else [s for s in seeds if s < budget.seeds]):
            for arm in arms:  # in the order given (--arms / --plan)
                if arm in PRETRAIN:
                    add(Job("pretrain", arm, seed))
            for task in tasks:
                for arm in arms:
                    if TASKS[task][2] == "caption" and arm not in CAPTION_ARMS:
                        continue  # only a caption-predicting pretraining has a caption to score
                    deps = [] if arm == "scratch" else [Job("pretrain", arm, seed).name]
                    add(Job("transfer", arm, seed, task, deps))
    return jobs


def pretrain_overrides(job: Job, out: Path, b: Budget) -> list[str]:
    return [f"train.seed={job.seed}", f"train.out_dir={out / 'pretrain'}", f"train.run_name={job.arm}-s{job.seed}",
            f"train.batch_size={b.pretrain_batch}", f"data.num_samples={b.pretrain_scenes}",
            f"train.epochs={b.pretrain_epochs}", f"optim.warmup_steps={b.pretrain_warmup}", "data.num_workers=0",
            "data.val_samples=8", f"train.ckpt_every={b.ckpt_every}", "train.log_every=25", "train.keep_last=1",
            "train.figure_at_end=false"]


def transfer_overrides(job: Job, out: Path, b: Budget) -> list[str]:
    cfg_path, extra, kind = TASKS[job.task]
    init = "scratch" if job.arm == "scratch" else str(out / "pretrain" / f"{job.arm}-s{job.seed}")
    own = job.task == "cls" and b.cls_own_recipe  # the config's sizes, batch and epochs as they are
    ov = [f"init={init}", *extra, f"train.seed={job.seed}", f"train.out_dir={out / 'transfer' / job.task}",
          f"train.run_name={job.arm}-s{job.seed}", "data.eval_split=test",
          *([] if own else [f"data.train_samples={b.ft_train_scenes}"]),
          f"data.test_samples={b.test_scenes}", "data.num_workers=0", f"train.ckpt_every={b.ckpt_every}",
          "train.keep_last=1", "train.log_every=16"]
    if kind == "finetune":
        if job.task == "cls":
            if not own:
                ov += [f"train.batch_size={b.ft_batch}", "train.epochs=1"]
        else:
            ov += [f"train.batch_size={b.ft_batch}", f"train.epochs={b.ft_epochs}", f"optim.warmup_steps={b.ft_warmup}"]
    else:
        ov.append(f"probe.epochs={b.probe_epochs}")
    return ov


Stage = tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...] | None]


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_plan(text: str) -> list[Stage]:
    """``--plan``: 'ARMS/TASKS[/SEEDS];...' (comma lists) -> (arms, tasks, seeds or None) stages.
    Raises ValueError naming the stage and the bad value."""
    plan: list[Stage] = []
    for stage in text.split(";"):
        if stage.count("/") not in (1, 2):
            raise ValueError(f"--plan: stage {stage!r} is not ARMS/TASKS or ARMS/TASKS/SEEDS")
        parts = [_names(part) for part in stage.split("/")]
        try:
            seeds = tuple(int(v) for v in parts[2]) if len(parts) == 3 else None
        except ValueError:
            raise ValueError(f"--plan: stage {stage!r}: seeds must be integers") from None
        for vals, allowed, what in ((parts[0], ALL_ARMS, "arm"), (parts[1], tuple(TASKS), "task")):
            bad = [v for v in vals if v not in allowed]
            if bad or not vals:
                raise ValueError(f"--plan: stage {stage!r}: unknown or no {what}s {bad}; choose from {list(allowed)}")
        plan.append((parts[0], parts[1], seeds))
    return plan


def choose(text: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...] | None:
    """``--arms`` / ``--tasks``: a comma list checked against ``allowed`` (None when not given)."""
    if not text:
        return None
    chosen = _names(text)
    bad = [v for v in chosen if v not in allowed]
    if bad:
        raise ValueError(f"--{what}: unknown {bad}; choose from {list(allowed)}")
    return chosen
