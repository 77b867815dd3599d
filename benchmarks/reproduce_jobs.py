"""``benchmarks/reproduce.py``'s jobs: what a worker process runs (one pretraining, fine-tune,
probe, OOD or caption job, through the library) and the scheduler that runs them on a process
pool, dependencies first, skipping finished ones. The protocols themselves (probe, OOD by MSP,
AUROC, caption words) are :mod:`multimae.evaluation.protocols`."""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from common import write_atomic, write_json_atomic
from reproduce_plan import (DOWNSTREAM_KEYS, PRETRAIN, PROBE_ATTR, ROOT, TASKS, Budget, Job, pretrain_overrides,
                            result_file, run_dir_of, transfer_overrides)


# ----------------------------------------------------------------------------- worker process

_SCENES: dict[tuple, Any] = {}


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


class _KeyView:
    """A cached dataset's samples restricted to some keys (what the library's own
    ``SyntheticScenes(modalities=keys)`` would return)."""

    def __init__(self, base: Any, keys: set[str]) -> None:
        self.base, self.keys = base, keys

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return {k: v for k, v in self.base[i].items() if k in self.keys or k == "__key__"}


def scene_datasets(cfg: Any) -> Any:
    """The raw downstream datasets of ``cfg`` with each synthetic split rendered once per worker
    process and shared between jobs (the library's ``data.cache`` renders it once per job), given
    to the library through its injection point (``FinetuneTask(cfg, datasets=...)``,
    ``probe_features(cfg, datasets)``). Same scenes as the library would render: a scene depends
    only on (seed, index). None (the library's own datasets) for other sources or splits."""
    from multimae.data.loader import CachedDataset
    from multimae.data.synthetic import SyntheticScenes
    from multimae.tasks.finetune_config import SPLITS, target_of

    d = cfg.data
    if d.source != "synthetic" or not d.cache or {d.train_split, d.eval_split} - set(SPLITS):
        return None
    keys = set(cfg.model.inputs) | {target_of(cfg)}

    def datasets(split: str, train: bool) -> Any:
        n = {"train": d.train_samples, "val": d.val_samples, "test": d.test_samples}[split]
        key = (d.seed + SPLITS.index(split), n, d.image_size)
        if key not in _SCENES:
            _SCENES[key] = CachedDataset(SyntheticScenes(n, image_size=d.image_size, seed=key[0],
                                                         modalities=list(DOWNSTREAM_KEYS)))
        return _KeyView(_SCENES[key], keys)
    return datasets


_ATTRS: dict[tuple, Any] = {}


def _attributes(seed: int, n: int, size: int) -> dict[str, Any]:
    """``synthetic.scene_attributes`` of scenes 0..n-1 of a stream, (n,) long tensors per attribute
    (rendered once per worker process)."""
    import torch

    from multimae.data.synthetic import ATTRIBUTE_CLASSES, scene_attributes

    key = (seed, n, size)
    if key not in _ATTRS:
        rows = [scene_attributes(seed, i, size) for i in range(n)]
        _ATTRS[key] = {a: torch.tensor([r[a] for r in rows], dtype=torch.long) for a in ATTRIBUTE_CLASSES}
    return _ATTRS[key]


@dataclass
class _Features:
    """What the probe / OOD jobs need of ``multimae.tasks.probe.ProbeFeatures`` (cacheable)."""

    cfg: Any
    train_x: Any
    train_y: Any
    eval_x: Any
    eval_y: Any
    report: str
    seconds: float


def _features(cfg: Any, cache: Path | None) -> _Features:
    """The library's ``probe_features`` of ``cfg`` (frozen encoder, mean-token features of both
    splits), cached in ``cache`` (one file per encoder, shared by its probe / OOD tasks: the
    features depend only on the encoder, the inputs and the scenes, which the file name and a
    stored key pin)."""
    import torch

    from multimae.tasks.probe import probe_features

    d = cfg.data
    key = {"init": str(cfg.init), "inputs": list(cfg.model.inputs), "seed": cfg.train.seed, "data_seed": d.seed,
           "train": [d.train_split, d.train_samples], "eval": [d.eval_split, d.test_samples, d.val_samples],
           "image_size": d.image_size}
    if cache is not None and cache.exists():
        blob = torch.load(cache, weights_only=False)
        if blob["key"] == key:
            return _Features(cfg, blob["train_x"], blob["train_y"], blob["eval_x"], blob["eval_y"], blob["report"],
                             blob["seconds"])
    f = probe_features(cfg, scene_datasets(cfg))
    out = _Features(f.cfg, f.train_x, f.train_y, f.eval_x, f.eval_y, f.report.summary(), f.seconds)
    if cache is not None:
        blob = {"key": key, "train_x": out.train_x, "train_y": out.train_y, "eval_x": out.eval_x,
                "eval_y": out.eval_y, "report": out.report, "seconds": out.seconds}
        write_atomic(cache, lambda tmp: torch.save(blob, tmp))
    return out


def _probe_data(cfg: Any, attr: str, cache: Path | None = None) -> tuple[_Features, Any, Any]:
    """Frozen features of the training and evaluation splits (``_features``) and the attribute
    ``attr`` of their scenes as labels; the features come in dataset order, which is checked
    against the scene label (the ``type`` attribute)."""
    from multimae.tasks.finetune_config import SPLITS

    f = _features(cfg, cache)
    d = f.cfg.data
    labels = []
    for split, n, y in ((d.train_split, d.train_samples, f.train_y), (d.eval_split, {"val": d.val_samples, "test":
                        d.test_samples, "train": d.train_samples}[d.eval_split], f.eval_y)):
        a = _attributes(d.seed + SPLITS.index(split), n, d.image_size)
        if len(y) != n or not bool((a["type"] == y).all()):
            raise RuntimeError(f"probe features of split {split!r} are not in scene order ({len(y)} labels, {n} "
                               f"scenes): cannot attach the {attr!r} attribute")
        labels.append(a[attr])
    return f, labels[0], labels[1]


def _fit(cfg: Any) -> Callable[[Any, Any, int], Any]:
    """The library's linear probe with ``cfg.probe``'s settings, as the protocols call it."""
    from multimae.tasks.probe import train_probe

    p = cfg.probe
    return lambda x, y, k: train_probe(x, y, k, p.epochs, p.batch_size, p.lr, p.weight_decay, cfg.train.seed)


def _attr_probe(cfg: Any, run_dir: Path, task: str, cache: Path | None = None) -> dict[str, Any]:
    """Linear probe of a scene attribute on frozen features (:func:`multimae.evaluation.protocols.probe_attribute`):
    top-1 on the evaluation split and the majority-class baseline of the training split."""
    from multimae.data.synthetic import ATTRIBUTE_CLASSES
    from multimae.evaluation.protocols import probe_attribute

    attr = PROBE_ATTR[task][0]
    f, tr_y, te_y = _probe_data(cfg, attr, cache)
    res = probe_attribute(_fit(f.cfg), f.train_x, tr_y, f.eval_x, te_y, len(ATTRIBUTE_CLASSES[attr]))
    res.update({"attribute": attr, "classes": ATTRIBUTE_CLASSES[attr], "num_train": len(tr_y), "num_samples": len(te_y),
                "split": f.cfg.data.eval_split, "init_report": f.report, "time": {"features_s": round(f.seconds, 2)}})
    write_json_atomic(run_dir / "eval.json", res)
    return res


def _ood(cfg: Any, run_dir: Path, task: str, cache: Path | None = None) -> dict[str, Any]:
    """OOD detection by the MSP of a linear probe on the in-distribution classes of an attribute
    (:func:`multimae.evaluation.protocols.ood_msp`; in-distribution = positive)."""
    from multimae.data.synthetic import ATTRIBUTE_CLASSES
    from multimae.evaluation.protocols import ood_msp

    attr, ood_in, ood_out = PROBE_ATTR[task]
    classes = ATTRIBUTE_CLASSES[attr]
    f, tr_y, te_y = _probe_data(cfg, attr, cache)
    res = ood_msp(_fit(f.cfg), f.train_x, tr_y, f.eval_x, te_y, len(classes), [classes.index(c) for c in ood_in],
                  [classes.index(c) for c in ood_out])
    res.update({"score": "max-softmax probability (MSP) of a linear probe (BatchNorm + linear) on frozen mean-token "
                         "features; in-distribution = positive", "attribute": attr,
                "in_classes": list(ood_in), "ood_classes": list(ood_out), "split": f.cfg.data.eval_split,
                "init_report": f.report, "time": {"features_s": round(f.seconds, 2)}})
    write_json_atomic(run_dir / "ood.json", res)
    return res


CAPTION_VAL_SCENES = 256  # held-out scenes of the caption metric (as benchmarks/m3ae_caption.py)


def _train_captions(run_dir: Path, seed: int, n: int = 2000) -> list[str]:
    """The first ``n`` captions of the pretraining stream of ``seed`` (the word-frequency
    baselines), cached once per seed for every arm."""
    from multimae.data.synthetic import SyntheticScenes

    cap_file = run_dir.parents[2] / "features" / f"train-captions-s{seed}.json"
    if cap_file.exists():
        return json.loads(cap_file.read_text())
    caps = [SyntheticScenes(n, image_size=32, seed=seed, modalities=["caption"])[i]["caption"] for i in range(n)]
    write_json_atomic(cap_file, caps)
    return caps


def _caption_eval(pretrain_dir: Path, run_dir: Path, seed: int) -> dict[str, Any]:
    """benchmarks/m3ae_caption.py's metric on a pretrained M3AE: the caption fully masked, the image
    fully visible, accuracy at the positions of colour / object-type words and position-free recall
    of those words (:func:`multimae.evaluation.protocols.caption_word_scores`), on held-out
    pretraining-stream scenes."""
    from multimae.data.loader import BatchSpec, eval_batches, load_text_tokenizer, text_collator
    from multimae.data.synthetic import COLORS, OBJECT_TYPES
    from multimae.evaluation.protocols import caption_word_scores
    from multimae.core.config import from_dict
    from multimae.runs import load_run
    from multimae.tasks.pretrain_config import PretrainConfig

    run = load_run(pretrain_dir)
    model, cfg, ckpt = run.model, from_dict(PretrainConfig, run.config), run.checkpoint
    tok = load_text_tokenizer(cfg.data.tokenizer)
    classes = {"colour": [tok.token_to_id(w) for w in COLORS], "type": [tok.token_to_id(w) for w in OBJECT_TYPES]}
    if any(i is None for v in classes.values() for i in v):
        raise RuntimeError(f"tokenizer {cfg.data.tokenizer!r} does not have every colour / type word as one token")
    enc = text_collator(cfg.data, list(model.input_specs.values())).encoder(_train_captions(run_dir, seed))
    cfg.data.val_samples = CAPTION_VAL_SCENES
    batches = eval_batches(BatchSpec.of(model), cfg.data, cfg.mask, seed, batch_size=32)
    res = caption_word_scores(model, batches, "caption", classes, enc["ids"], enc["pad"])
    res.update({"checkpoint": str(ckpt), "val_scenes": CAPTION_VAL_SCENES, "protocol": "caption fully masked, image "
                "fully visible; held-out scenes of the pretraining data's validation stream "
                "(benchmarks/m3ae_caption.py)"})
    write_json_atomic(run_dir / "caption.json", res)
    return res


def _pretrain(job: Job, out: Path, budget: Budget) -> dict[str, Any]:
    from multimae.core.config import load_config
    from multimae.engine.trainer import Trainer
    from multimae.tasks.pretrain import PretrainTask
    from multimae.tasks.pretrain_config import PretrainConfig

    cfg_path, extra = PRETRAIN[job.arm]
    cfg = load_config(PretrainConfig, ROOT / cfg_path, extra + pretrain_overrides(job, out, budget))
    trainer = Trainer(PretrainTask(cfg))
    trainer.fit(evaluate=False)  # the transfer jobs evaluate it
    return {"steps": trainer.step, "total_steps": trainer.total_steps, "batch_size": cfg.train.batch_size,
            "num_visible": cfg.mask.num_visible, "mask": asdict(cfg.mask),
            "inputs": list(cfg.model.inputs), "outputs": list(cfg.model.outputs),
            "params_m": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 3)}


def _transfer(job: Job, out: Path, budget: Budget, run_dir: Path) -> dict[str, Any]:
    from multimae.core.config import load_config
    from multimae.tasks.finetune_config import FinetuneConfig

    cfg_path, _, kind = TASKS[job.task]
    if kind == "caption":
        return _caption_eval(out / "pretrain" / f"{job.arm}-s{job.seed}", run_dir, job.seed)
    cfg = load_config(FinetuneConfig, ROOT / cfg_path, transfer_overrides(job, out, budget))
    features = out / "features" / f"{job.arm}-s{job.seed}.pt"
    if kind == "probe":  # probe_rgb (the scene label) as the library's run_probe, on cached features
        return _attr_probe(cfg, run_dir, job.task, features)
    if kind == "ood":
        return _ood(cfg, run_dir, job.task, features)
    from multimae.engine.trainer import Trainer
    from multimae.tasks.finetune import FinetuneTask

    trainer = Trainer(FinetuneTask(cfg, datasets=scene_datasets(cfg)))
    trainer.fit()
    return {**(trainer.task.eval_result or {}), "steps": trainer.step}


def run_job(job: Job, out: str, budget: Budget) -> dict[str, Any]:
    """Runs in a worker process: one pretraining or transfer job; output to its run dir's job.log."""
    import torch

    out_p = Path(out)
    rd = run_dir_of(out_p, job)
    rd.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    with open(rd / "job.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        torch.set_num_threads(1)
        res = _pretrain(job, out_p, budget) if job.stage == "pretrain" else _transfer(job, out_p, budget, rd)
    res["job_s"] = round(time.perf_counter() - tic, 1)
    if job.stage == "pretrain":
        write_json_atomic(rd / "pretrain_done.json", res)
    else:
        write_json_atomic(rd / "job_time.json", {"job_s": res["job_s"]})
    return res


# ------------------------------------------------------------------------------ scheduling

class _Scheduler:
    """Bookkeeping of one :func:`schedule` call: which jobs are done, failed, pending, running."""

    def __init__(self, jobs: list[Job], out: Path, budget: Budget, workers: int, stop_at: float | None) -> None:
        self.out, self.budget, self.workers, self.stop_at = out, budget, workers, stop_at
        self.t0, self.total = time.time(), len(jobs)
        self.records: dict[str, dict[str, Any]] = {}
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.pending: list[Job] = []
        for j in jobs:
            if result_file(out, j).exists():
                self.done.add(j.name)
                self.records[j.name] = {"status": "cached"}
            else:
                self.pending.append(j)
        self.finished = len(self.done)
        self.running: dict[cf.Future, tuple[Job, float]] = {}

    def elapsed(self) -> str:
        return hms(time.time() - self.t0)

    def _drop_pending(self, status: str) -> None:
        for j in self.pending:
            self.records[j.name] = {"status": status}
        self.pending = []

    def next_ready(self) -> Job | None:
        """The first pending job whose dependencies are done (a job whose dependency failed is
        marked skipped on the way); None when none is ready now."""
        if self.stop_at is not None and time.time() > self.stop_at:
            print(f"--stop-at reached: {len(self.pending)} job(s) not started", flush=True)
            self._drop_pending("not run (--stop-at reached)")
            return None
        for j in list(self.pending):
            if any(d in self.failed for d in j.deps):
                self.records[j.name] = {"status": "skipped (dependency failed)"}
                self.failed.add(j.name)
                self.pending.remove(j)
                self.finished += 1
            elif all(d in self.done for d in j.deps):
                self.pending.remove(j)
                return j
        if not self.running:  # nothing can become ready
            self._drop_pending("not run (unmet dependency)")
        return None

    def fill(self, pool: cf.ProcessPoolExecutor) -> None:
        while len(self.running) < self.workers and self.pending:
            job = self.next_ready()
            if job is None:
                return
            self.running[pool.submit(run_job, job, str(self.out), self.budget)] = (job, time.time())
            print(f"[start] {job.name} (elapsed {self.elapsed()})", flush=True)

    def finish(self, fut: cf.Future) -> None:
        job, start = self.running.pop(fut)
        self.finished += 1
        wall = time.time() - start
        try:
            res = fut.result()
            self.done.add(job.name)
            rec = {"status": "ok", "start": start - self.t0, "end": time.time() - self.t0, "wall_s": round(wall, 1)}
            msg = _summary(job, res)
        except Exception as e:  # keep going; the report shows the missing cell
            self.failed.add(job.name)
            rec = {"status": f"failed: {type(e).__name__}: {e}", "wall_s": round(wall, 1)}
            msg = f"FAILED ({type(e).__name__}: {e}); log: {run_dir_of(self.out, job) / 'job.log'}"
        self.records[job.name] = rec
        print(f"[{self.finished}/{self.total}] {job.name}: {msg} ({wall:.0f}s; elapsed {self.elapsed()})", flush=True)


def schedule(jobs: list[Job], out: Path, budget: Budget, workers: int, stop_at: float | None) -> dict[str, Any]:
    """Run the jobs on ``workers`` processes, dependencies first, skipping finished ones; no new
    job starts after ``stop_at`` (epoch seconds). Returns per-job records."""
    s = _Scheduler(jobs, out, budget, workers, stop_at)
    print(f"{s.total} jobs, {len(s.done)} already done (skipped), {len(s.pending)} to run on {workers} worker(s)",
          flush=True)
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                initializer=_init_worker) as pool:
        while s.pending or s.running:
            s.fill(pool)
            if not s.running:
                continue
            finished, _ = cf.wait(list(s.running), return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                s.finish(fut)
    return s.records


def _summary(job: Job, res: dict[str, Any]) -> str:
    if job.stage == "pretrain":
        return f"{res.get('steps')} steps"
    m = res.get("metrics", {})
    return ", ".join(f"{k} {v:.3g}" for k, v in m.items() if isinstance(v, (int, float)) and k != "per_class_iou")


def hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

