"""Exact resume on streamed shards: an interrupted CPU fp32 run with 2 DataLoader workers, resumed
mid-epoch, ends with bitwise the weights of the uninterrupted run."""
import torch

from multimae.checkpoint import find_latest, load_weights
from multimae.core.config import load_config
from multimae.data.shards import write_shards
from multimae.data.synthetic import SyntheticScenes
from multimae.tasks.pretrain_config import PretrainConfig
from multimae.engine.trainer import Trainer
from multimae.tasks.pretrain import PretrainTask
from tiny import TINY_OVERRIDES

TINY = [
    *TINY_OVERRIDES, "model.decoder_depth=1", "model.modalities={semseg: {num_classes: 6}}", "mask.num_visible=12",
    "optim.lr=2e-3", "optim.warmup_steps=2", "train.batch_size=4", "train.epochs=3", "train.log_every=100",
    "train.figure_at_end=false", "train.eval_at_end=false", "train.ckpt_every=100", "train.precision=fp32",
    "train.device=cpu",
    "data.source=shards", "data.num_workers=2", "data.num_samples=24", "data.shuffle_buffer=6",
]


def test_shard_run_resumed_mid_epoch_matches_uninterrupted(tmp_path):
    ds = SyntheticScenes(24, image_size=32, seed=3, modalities=["rgb", "depth", "semseg"])
    urls = write_shards((ds[i] for i in range(len(ds))), str(tmp_path / "shard-%06d.tar"), max_count=6)

    def cfg(name, steps, *extra):
        return load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml",
                           TINY + [f"train.out_dir={tmp_path}", f"data.urls={','.join(urls)}", f"train.run_name={name}",
                                   f"train.max_steps={steps}", *extra])

    full = Trainer(PretrainTask(cfg("full", 9)))
    assert full.steps_per_epoch == 6
    full.fit()
    Trainer(PretrainTask(cfg("cut", 7))).fit()  # stops at batch 1 of epoch 1 (odd: the DataLoader workers swap roles)
    resumed = Trainer(PretrainTask(cfg("cut", 9)))
    assert resumed.step == 7
    resumed.fit()
    wa, wb = load_weights(find_latest(tmp_path / "full")), load_weights(find_latest(tmp_path / "cut"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    init = Trainer(PretrainTask(cfg("init", 0, "train.resume=null"))).model.state_dict()
    assert not torch.equal(init["encoder.0.attn.qkv.weight"], wa["encoder.0.attn.qkv.weight"])
