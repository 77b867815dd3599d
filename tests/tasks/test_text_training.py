"""Text in the engine: paired, image-only and text-only batches train through the M3AE config;
absent modalities contribute no tokens and no loss."""
import torch

from multimae.core.batch import Batch

from multimae.core.config import load_config
from multimae.tasks.pretrain_config import PretrainConfig
from multimae.engine.trainer import Trainer
from multimae.tasks.pretrain import PretrainTask
from multimae.engine.step import read_stats, train_step

SMALL = ["model.preset=nano", "model.depth=2", "model.image_size=32", "model.patch_size=8", "model.decoder_depth=1",
         "data.image_size=32", "data.num_samples=64", "data.val_samples=8", "data.num_workers=0", "data.cache=false",
         "train.batch_size=8", "train.figure_at_end=false"]


def trainer(tmp_path, *extra):
    cfg = load_config(PretrainConfig, "configs/pretrain/synthetic-m3ae-tiny.yaml",
                      SMALL + [f"train.out_dir={tmp_path}", *extra])
    return Trainer(PretrainTask(cfg))


def test_paired_image_only_and_text_only_batches_train(tmp_path):
    tr = trainer(tmp_path, "train.run_name=mix")
    batch, plan = next(iter(tr.loader))
    assert batch["caption"].dtype == torch.int64 and batch.pad["caption"].dtype == torch.bool
    n_text = tr.model.input_specs["caption"].num_classes
    assert n_text == tr.loader.collate_fn.text.encoder.vocab_size  # vocabulary sized from the tokenizer
    B = batch["rgb"].shape[0]
    for kind in ("paired", "image_only", "text_only"):
        b = Batch({k: v.clone() for k, v in batch.items()}, pad={k: v.clone() for k, v in batch.pad.items()},
                  present={"rgb": torch.ones(B, dtype=torch.bool), "caption": torch.ones(B, dtype=torch.bool)})
        if kind == "image_only":
            b.present["caption"][:] = False
            b.pad["caption"][:] = True
        if kind == "text_only":
            b.present["rgb"][:] = False
            b["rgb"].zero_()
        plan = tr.loader.collate_fn.plan(b, torch.Generator().manual_seed(0))
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        stats = read_stats(train_step(tr.model, b, tr.optimizer, plan))
        assert torch.isfinite(torch.tensor(stats["loss"]))
        # an absent modality has no token to score: its loss is exactly 0 (kept in the graph for DDP)
        assert (stats["loss/caption"] == 0.0) == (kind == "image_only")
        assert (stats["loss/rgb"] == 0.0) == (kind == "text_only")
        moved = [n for n, p in tr.model.named_parameters() if not torch.equal(before[n], p)]
        assert moved, kind
        out = tr.model(b, plan)
        if kind == "text_only":  # no rgb token is encoded
            rgb = next(s for s in out.encoded.layout if s.name == "rgb")
            assert out.encoded.masked[:, rgb.start:rgb.end].all()
        if kind == "image_only":
            cap = next(s for s in out.encoded.layout if s.name == "caption")
            assert out.encoded.masked[:, cap.start:cap.end].all()


def test_ratio_masking_honoured_per_sample(tmp_path):
    tr = trainer(tmp_path, "train.run_name=ratio")
    batch, plan = next(iter(tr.loader))
    real = (~batch.pad["caption"]).sum(1)
    vis = (~plan.masks["caption"]).sum(1)
    assert torch.equal(vis, real - torch.round(real.double() * 0.75).long())
    assert torch.equal((~plan.masks["rgb"]).sum(1), torch.full_like(vis, 4))  # 16 tokens, 75% hidden
    assert not ((~plan.masks["caption"]) & batch.pad["caption"]).any()


def test_unpaired_mixing_fractions(tmp_path):
    tr = trainer(tmp_path, "train.run_name=unp", "data.image_only=0.25", "data.text_only=0.25", "data.num_samples=256",
                 "train.batch_size=64")
    counts = torch.zeros(3)
    for i, (b, _) in enumerate(tr.loader):
        counts += torch.stack([(b.present["caption"] & b.present["rgb"]).sum(), (~b.present["caption"]).sum(),
                               (~b.present["rgb"]).sum()]).float()
    frac = counts / counts.sum()
    assert torch.allclose(frac, torch.tensor([0.5, 0.25, 0.25]), atol=0.08)


def test_multitask_m3ae_config_trains_with_per_sample_ratios(tmp_path):
    cfg = load_config(PretrainConfig, "configs/pretrain/synthetic-m3ae-multitask.yaml",
                      SMALL + [f"train.out_dir={tmp_path}", "train.run_name=mt", "train.max_steps=2",
                               "train.eval_at_end=false"])
    assert cfg.mask.ratios == {"rgb": (0.25, 0.75), "caption": (0.5, 1.0)}
    tr = Trainer(PretrainTask(cfg))
    assert set(tr.model.output_specs) == {"rgb", "depth", "semseg", "caption"}
    batch, plan = next(iter(tr.loader))
    real = ~batch.pad["caption"]
    hidden = (plan.masks["caption"] & real).sum(1).double() / real.sum(1)
    assert (hidden >= 0.5 - 1 / 32).all() and hidden.unique().numel() > 1  # a ratio per sample
    stats = read_stats(train_step(tr.model, batch, tr.optimizer, plan))
    assert all(stats[f"loss/{t}"] > 0 for t in ("rgb", "depth", "semseg", "caption"))
