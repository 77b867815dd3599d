"""configs/pretrain/multimae-b-1600e.yaml against the official MultiMAE-B recipe, field by field.

OFFICIAL holds the values of the official ``cfgs/pretrain/multimae-b_98_rgb+-depth-semseg_1600e.yaml``
(commit 66910f5) and, for keys that file leaves to the script, the defaults of its
``run_pretraining_multimae.py`` argument parser. Every key is either compared with what our config
resolves to (COMPARED) or listed in NOT_COMPARED with the reason, so a key cannot be forgotten.
"""
import pytest

from multimae.core.config import load_config
from multimae.tasks.pretrain_config import PretrainConfig

RECIPE = "configs/pretrain/multimae-b-1600e.yaml"

OFFICIAL = {
    # the yaml
    "in_domains": "rgb-depth-semseg",
    "out_domains": "rgb-depth-semseg",
    "standardize_depth": True,
    "extra_norm_pix_loss": True,
    "model": "pretrain_multimae_base",
    "decoder_dim": 256,
    "input_size": 224,
    "patch_size": 16,
    "alphas": 1.0,
    "num_encoded_tokens": 98,
    "num_global_tokens": 1,
    "decoder_use_task_queries": True,
    "decoder_depth": 2,
    "epochs": 1600,
    "opt": "adamw",
    "blr": 1e-4,
    "warmup_lr": 1e-6,
    "min_lr": 0.0,
    "warmup_epochs": 40,
    "batch_size": 256,
    "hflip": 0.5,
    "loss_on_unmasked": False,
    "fp32_output_adapters": "semseg",
    "data_path": "/path/to/dataset",
    "log_wandb": False,
    "output_dir": "output/pretrain/multimae-b_98_rgb+-depth-semseg_1600e",
    # script defaults the yaml relies on
    "opt_betas": [0.9, 0.95],
    "opt_eps": 1e-8,
    "weight_decay": 0.05,
    "weight_decay_end": None,  # constant weight decay
    "clip_grad": None,
    "drop_path": 0.0,
    "decoder_num_heads": 8,
    "sample_tasks_uniformly": False,
    "num_workers": 10,
    # pretrain_multimae_base
    "encoder_dim": 768,
    "encoder_depth": 12,
    "encoder_heads": 12,
    "semseg_num_classes": 133,
}

NOT_COMPARED = {
    "loss_on_unmasked": "losses are always on masked tokens only (tests/model/test_model.py::"
                        "test_loss_ignores_targets_of_visible_tokens)",
    "data_path": "a placeholder in both",
    "log_wandb": "logging goes to metrics.jsonl and TensorBoard",
    "output_dir": "train.out_dir / train.run_name",
    "opt": "AdamW is the only optimizer of the pretraining engine",
    "weight_decay_end": "weight decay is constant, as with weight_decay_end None",
}


def _ours():
    cfg = load_config(PretrainConfig, RECIPE)
    model = cfg.model.resolved()
    specs = {s.name: s for s in model.specs(sorted(set(model.inputs) | set(model.outputs)))}
    return cfg, model, specs


def _compared(cfg, model, specs) -> dict:
    """Our value for each official key (translated to the official spelling)."""
    inputs_only = [o for o in model.outputs if specs[o].input]
    return {
        "in_domains": "-".join(model.inputs),
        "out_domains": "-".join(inputs_only),
        "standardize_depth": specs["depth"].standardize == "robust",
        "extra_norm_pix_loss": "norm_rgb" in model.outputs and specs["norm_rgb"].norm_pix
        and specs["norm_rgb"].key == "rgb",
        "model": {(768, 12, 12): "pretrain_multimae_base"}.get((model.dim, model.depth, model.num_heads), "?"),
        "decoder_dim": model.decoder_dim,
        # the data's size: its own, or (left unset) the model's
        "input_size": model.image_size if cfg.data.image_size in (None, model.image_size) else -1,
        "patch_size": model.patch_size,
        "alphas": cfg.mask.alpha if cfg.mask.strategy == "dirichlet" else -1,
        "num_encoded_tokens": cfg.mask.num_visible,
        "num_global_tokens": model.num_global_tokens,
        "decoder_use_task_queries": model.use_task_queries,
        "decoder_depth": model.decoder_depth,
        "epochs": cfg.train.epochs,
        "blr": cfg.optim.base_lr if cfg.optim.lr is None else -1,
        "warmup_lr": cfg.optim.warmup_lr,
        "min_lr": cfg.optim.min_lr,
        "warmup_epochs": cfg.optim.warmup_epochs if cfg.optim.warmup_steps is None else -1,
        "batch_size": cfg.train.batch_size,
        "hflip": cfg.data.hflip,
        "fp32_output_adapters": "-".join(model.fp32_outputs),
        "opt_betas": list(cfg.optim.betas),
        "opt_eps": 1e-8,  # build_optimizer's default, checked below
        "weight_decay": cfg.optim.weight_decay,
        "clip_grad": cfg.optim.clip_grad,
        "drop_path": model.drop_path,
        "decoder_num_heads": model.decoder_heads,
        "sample_tasks_uniformly": cfg.mask.sample_subsets,
        "num_workers": cfg.data.num_workers,
        "encoder_dim": model.dim,
        "encoder_depth": model.depth,
        "encoder_heads": model.num_heads,
        "semseg_num_classes": specs["semseg"].num_classes,
    }


def test_every_official_key_is_compared_or_explained():
    cfg, model, specs = _ours()
    ours = _compared(cfg, model, specs)
    assert set(ours) | set(NOT_COMPARED) == set(OFFICIAL)
    assert not set(ours) & set(NOT_COMPARED)


@pytest.mark.parametrize("key", sorted(set(OFFICIAL) - set(NOT_COMPARED)))
def test_recipe_matches_the_official_value(key):
    cfg, model, specs = _ours()
    assert _compared(cfg, model, specs)[key] == OFFICIAL[key], key


def test_optimizer_eps_default_is_the_official_one():
    import inspect

    from multimae.engine.optim import build_optimizer

    assert inspect.signature(build_optimizer).parameters["eps"].default == OFFICIAL["opt_eps"]


def test_warmup_lr_reaches_the_scheduler(tmp_path):
    """optim.warmup_lr is the lr of the first step; it rises linearly to the peak lr."""
    from multimae.engine.trainer import Trainer
    from multimae.tasks.pretrain import PretrainTask

    cfg = load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml", [
        "model.depth=1", "model.image_size=32", "model.patch_size=8", "data.image_size=32", "data.num_samples=16",
        "data.num_workers=0", "data.cache=false", "mask.num_visible=12", "train.batch_size=8", "optim.lr=1e-3",
        "optim.warmup_steps=4", "optim.warmup_lr=3e-5", f"train.out_dir={tmp_path}", "train.resume=null"])
    tr = Trainer(PretrainTask(cfg))
    lrs = []
    for _ in range(5):
        lrs.append(tr.optimizer.param_groups[0]["lr"])
        tr.scheduler.step()
    assert lrs == pytest.approx([3e-5, 3e-5 + (1e-3 - 3e-5) / 4, 3e-5 + (1e-3 - 3e-5) / 2,
                                 3e-5 + 3 * (1e-3 - 3e-5) / 4, 1e-3])
