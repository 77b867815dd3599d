"""Fine-tuning on samples lacking an input modality (data.missing=allow): the transfer model uses
the inputs a sample has; a sample lacking the target is left out and counted."""
import json
import logging

import numpy as np
import torch
from PIL import Image

from multimae.cli.main import main
from multimae.core.batch import Batch
from multimae.model.transfer import HeadConfig, TransferModel, TransferModelConfig
from tiny import tiny_config, tiny_encoder_override

TINY = [tiny_encoder_override(depth=1),
        "data.image_size=32", "data.num_workers=0", "train.batch_size=2", "train.eval_batch_size=4",
        "train.epochs=1", "train.max_steps=2", "train.log_every=1", "train.precision=fp32", "model.drop_path=0",
        "aug.randaugment=false", "aug.mixup=0", "aug.cutmix=0", "model.head.embed_dim=32",
        "model.head.num_classes=4", "model.inputs=[rgb,depth]", "data.eval_split=val"]


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _rgbd_seg_tree(root, n=6):
    """rgb + semseg for every sample but the last (no semseg: no target); depth for odd i only."""
    for split in ("train", "val"):
        for i in range(n):
            g = np.random.default_rng(i)
            _png(root / split / "rgb" / "all" / f"s{i}.png", g.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            if i % 2:
                _png(root / split / "depth" / "all" / f"s{i}.png", g.integers(1, 65535, (32, 32), dtype=np.uint16))
            if i < n - 1:
                _png(root / split / "semseg" / "all" / f"s{i}.png", np.full((32, 32), i % 4, np.uint8))


def test_transfer_model_uses_the_inputs_a_sample_has():
    """A sample lacking depth gets the output the same weights give from its rgb alone; what
    stands in for its depth never matters."""
    enc = tiny_config()
    for head in (HeadConfig(kind="classification", num_classes=3), HeadConfig(kind="segmentation", num_classes=3,
                                                                                 embed_dim=32)):
        torch.manual_seed(0)
        both = TransferModel(TransferModelConfig(encoder=enc, inputs=["rgb", "depth"], head=head, drop_path=0)).eval()
        rgb_only = TransferModel(TransferModelConfig(encoder=enc, inputs=["rgb"], head=head, drop_path=0)).eval()
        rgb_only.load_state_dict({k: v for k, v in both.state_dict().items() if "depth" not in k})
        g = torch.Generator().manual_seed(1)
        rgb, depth = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 1, 32, 32, generator=g)
        present = torch.tensor([True, False, True])
        batch = Batch({"rgb": rgb, "depth": depth}, present={"depth": present})
        with torch.no_grad():
            out = both(batch)
            other = both(Batch({"rgb": rgb, "depth": torch.randn(3, 1, 32, 32, generator=g)},
                               present={"depth": present}))
            alone = rgb_only({"rgb": rgb})
            full = both({"rgb": rgb, "depth": depth})
        torch.testing.assert_close(out[1], alone[1], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[1], other[1])  # the absent sample's stand-in is never read
        torch.testing.assert_close(out[0], full[0], atol=1e-5, rtol=1e-5)  # present samples: as before
        assert not torch.allclose(out[0], alone[0], atol=1e-3)
        f = both.features(batch)
        torch.testing.assert_close(f[1], rgb_only.features({"rgb": rgb})[1], atol=1e-5, rtol=1e-5)


def test_finetune_on_samples_lacking_depth_and_target(tmp_path, capsys, caplog):
    root = tmp_path / "data"
    _rgbd_seg_tree(root)
    args = ["finetune", "--config", "configs/finetune/folder-semseg.yaml", *TINY, f"data.root={root}",
            f"train.out_dir={tmp_path / 'runs'}"]
    assert main(args + ["train.run_name=strict"]) == 2  # default data.missing=error: the file is named
    err = capsys.readouterr().err
    assert "missing depth file" in err and "depth/all/s0.<png" in err
    with caplog.at_level(logging.WARNING, logger="multimae.data"):
        assert main(args + ["train.run_name=allow", "data.missing=allow"]) == 0
    notes = [r.getMessage() for r in caplog.records if "lacking a modality file" in r.getMessage()]
    assert notes and "left out 1 of 6" in notes[0] and "semseg 1" in notes[0]  # the target must be present
    rows = [json.loads(x) for x in (tmp_path / "runs" / "allow" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2


def test_finetune_skip_leaves_incomplete_samples_out(tmp_path):
    root = tmp_path / "data"
    _rgbd_seg_tree(root)
    assert main(["finetune", "--config", "configs/finetune/folder-semseg.yaml", *TINY, f"data.root={root}",
                 f"train.out_dir={tmp_path / 'runs'}", "train.run_name=skip", "data.missing=skip"]) == 0
    ev = json.loads((tmp_path / "runs" / "skip" / "eval.json").read_text())
    assert ev["num_samples"] == 2  # s1, s3 have rgb, depth and semseg (s5 lacks semseg)
