"""Fine-tuning on WebDataset shards and under a 2-process ``torchrun`` (gloo on CPU), end to end
through the CLI: the run trains, checkpoints once (rank 0), and writes its evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from multimae.checkpoint import find_latest, load_weights
from multimae.core.config import load_config
from multimae.data.shards import write_shards
from multimae.data.synthetic import SyntheticScenes
from multimae.engine.trainer import Trainer
from multimae.tasks.finetune import FinetuneTask
from multimae.tasks.finetune_config import FinetuneConfig
from tiny import tiny_encoder_override

ROOT = Path(__file__).resolve().parents[3]
TINY_ENCODER = tiny_encoder_override(dim=48, modalities={"semseg": {"num_classes": 6}})
TINY = [TINY_ENCODER, "data.image_size=32", "data.num_workers=0", "train.batch_size=4", "train.eval_batch_size=8",
        "train.epochs=1", "train.log_every=2"]



def cli(args: list[str], torchrun: int = 0, port: int | None = None) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "multimae.cli.main"]
    if torchrun:
        head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                "--master_port", str(port), "-m", "multimae.cli.main"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(head + args, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def shards(tmp_path: Path) -> tuple[str, str]:
    train = write_shards(SyntheticScenes(16, image_size=32, seed=1_000_000, modalities=["rgb", "semseg", "label"]),
                         str(tmp_path / "train-%03d.tar"), 8)
    val = write_shards(SyntheticScenes(8, image_size=32, seed=1_000_001, modalities=["rgb", "semseg", "label"]),
                       str(tmp_path / "val-%03d.tar"), 8)
    assert len(train) == 2 and len(val) == 1
    return ",".join(train), val[0]


def test_segmentation_and_classification_from_shards(tmp_path):
    train, val = shards(tmp_path)
    shard_args = ["data.source=shards", f"data.train_urls={train}", f"data.eval_urls={val}", f"train.out_dir={tmp_path}"]
    r = cli(["finetune", "--config", "configs/finetune/synthetic-semseg.yaml", *TINY, "model.head.embed_dim=64",
             *shard_args, "train.run_name=semseg"])
    assert "4 steps/epoch" in r.stdout  # 16 samples counted from the shards / batch 4
    # classification reads the label from the shards' ``cls`` field (in process: no second CLI start)
    cfg = load_config(FinetuneConfig, "configs/finetune/synthetic-cls.yaml", TINY + shard_args + ["train.run_name=cls"])
    trainer = Trainer(FinetuneTask(cfg))
    assert trainer.steps_per_epoch == 4
    trainer.fit()
    for task, metric in (("semseg", "miou"), ("cls", "top1")):
        res = json.loads((tmp_path / task / "eval.json").read_text())
        assert res["num_samples"] == 8  # every evaluation shard sample scored once
        assert 0.0 <= res["metrics"][metric] <= 100.0, res["metrics"]
    # the classification baseline was learnt from the training shards' labels
    labels = [int(s["label"]) for s in SyntheticScenes(16, image_size=32, seed=1_000_000, modalities=["label"])]
    res = json.loads((tmp_path / "cls" / "eval.json").read_text())
    assert res["baseline_answer"]["value"] == max(set(labels), key=labels.count)


def test_torchrun_two_process_finetune(tmp_path, free_port):
    train, val = shards(tmp_path)
    common = ["finetune", "--config", "configs/finetune/synthetic-semseg.yaml", *TINY, "model.head.embed_dim=64",
              "data.source=shards", f"data.train_urls={train}", f"data.eval_urls={val}", f"train.out_dir={tmp_path}"]
    r = cli(common + ["train.run_name=ddp"], torchrun=2, port=free_port())
    assert "world size 2" in r.stdout
    assert r.stdout.count("run directory:") == 1  # rank 0 only
    assert "2 steps/epoch" in r.stdout  # 16 samples split over 2 ranks of batch 4
    ckpt = find_latest(tmp_path / "ddp")
    assert ckpt is not None and ckpt.name.endswith("2")
    sd = load_weights(ckpt)
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    assert json.loads((tmp_path / "ddp" / "eval.json").read_text())["num_samples"] == 8
