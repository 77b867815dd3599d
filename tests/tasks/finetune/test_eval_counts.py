"""Evaluation scores every held-out sample exactly once: no partial batch dropped, no skipped
sample replaced by another; the linear probe's progress counts optimizer steps."""
import io
import json

import torch

from multimae.cli.main import main
from tiny import tiny_config


def test_pretraining_held_out_batches_cover_every_sample():
    from multimae.data.config import DataConfig, MaskConfig
    from multimae.data.loader import BatchSpec, eval_batches
    from multimae.model.multimae import MultiMAE

    model = MultiMAE(tiny_config(depth=1, image_size=16, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                                 modalities={"semseg": {"num_classes": 6}}))
    data = DataConfig(val_samples=24, image_size=16)
    batches = eval_batches(BatchSpec.of(model), data, MaskConfig(num_visible=4), 0, batch_size=16)
    assert [b.size for b, _ in batches] == [12, 12]  # 24 of 24 (was 16: one full batch)
    batches = eval_batches(BatchSpec.of(model), DataConfig(val_samples=5, image_size=16), MaskConfig(num_visible=4),
                           0, batch_size=16)
    assert [b.size for b, _ in batches] == [5]


def test_evaluate_with_skip_scores_each_good_sample_once(tmp_path, capsys):
    from finetune_trees import cls_tree, finetune

    cls_tree(tmp_path, {"train": {"a": 3, "b": 3}, "val": {"a": 3, "b": 2}})
    (tmp_path / "val" / "rgb" / "a" / "a1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert finetune(tmp_path, "folder-cls", tmp_path, "model.head.num_classes=2", "data.on_error=skip",
                     "train.eval_batch_size=3", "train.max_steps=null") == 0
    run = tmp_path / "runs" / "r"
    assert json.loads((run / "eval.json").read_text())["num_samples"] == 4  # 5 minus the broken one (was 5)
    assert main(["evaluate", "--checkpoint", str(run), "data.on_error=skip"]) == 0
    assert json.loads((run / "eval-val.json").read_text())["num_samples"] == 4


def test_probe_progress_counts_steps_not_epochs():
    from multimae.engine.logging import Progress
    from multimae.tasks.probe import probe_steps, train_probe

    x, y = torch.randn(10, 8), torch.tensor([0, 1] * 5)
    assert probe_steps(10, 4) == 3 and probe_steps(9, 4) == 2  # a last batch of one sample is left out
    out = io.StringIO()
    progress = Progress(2 * probe_steps(10, 4), log_every=1, stream=out)
    train_probe(x, y, 2, epochs=2, batch_size=4, lr=1e-2, weight_decay=0.0, progress=progress)
    progress.close()
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    assert lines[-1].startswith("step 6/6") and len(lines) == 6
