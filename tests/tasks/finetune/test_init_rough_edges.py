"""Fine-tuning a ``folder-*`` recipe from a small run: the error names ``model.encoder=null``, the
image size the run was trained at is said, and a ``convert --to timm`` file of a non-standard
width works as init (its head count is recorded); a foreign one gets a suggestion that works."""
import logging

from safetensors.torch import load_file, save_file

from multimae.checkpoint import save_checkpoint
from multimae.cli.main import main
from multimae.core.config import to_dict
from multimae.model.multimae import ModelConfig, MultiMAE
from tiny import TINY

ENC = dict(TINY, dim=48)
RUN = ["data.num_workers=0", "train.batch_size=2", "train.eval_batch_size=4", "train.epochs=1", "train.max_steps=1",
       "train.precision=fp32", "aug.randaugment=false", "aug.mixup=0", "aug.cutmix=0", "model.head.num_classes=2"]


def finetune(tmp_path, name, *extra):
    return main(["finetune", "--config", "configs/finetune/folder-cls.yaml", f"data.root={tmp_path / 'data'}",
                 f"train.out_dir={tmp_path / 'runs'}", f"train.run_name={name}", *RUN, *extra])


def _setup(tmp_path):
    from finetune_trees import cls_tree

    cls_tree(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    cfg = ModelConfig(**ENC, inputs=["rgb"], outputs=["rgb"], decoder_dim=16, decoder_depth=1, decoder_heads=2)
    save_checkpoint(tmp_path / "pre", 5, MultiMAE(cfg).state_dict(), {"step": 5},
                    {"config": {"model": to_dict(cfg)}, "epoch": 1})
    return tmp_path / "pre"


def test_folder_recipe_from_a_small_run(tmp_path, capsys, caplog):
    pre = _setup(tmp_path)
    assert finetune(tmp_path, "a", f"init={pre}") == 2
    err = capsys.readouterr().err
    assert "dim: config 768 vs checkpoint 48" in err and "set model.encoder=null" in err and err.count("\n") == 1
    with caplog.at_level(logging.WARNING, logger="multimae"):
        assert finetune(tmp_path, "b", f"init={pre}", "model.encoder=null") == 0
    assert any("the init was trained at 32 px" in r.getMessage() and "data.image_size=32" in r.getMessage()
               for r in caplog.records)


def test_timm_file_of_a_non_standard_width_as_init(tmp_path, capsys):
    pre = _setup(tmp_path)
    vit = tmp_path / "vit.safetensors"
    assert main(["convert", str(pre), str(vit), "--to", "timm"]) == 0
    assert finetune(tmp_path, "c", f"init={vit}", "model.encoder=null", "data.image_size=32") == 0
    foreign = tmp_path / "foreign.safetensors"  # the same tensors without the recorded head count
    save_file(load_file(str(vit)), str(foreign))
    capsys.readouterr()
    assert finetune(tmp_path, "d", f"init={foreign}", "model.encoder=null") == 2
    err = capsys.readouterr().err
    hint = "model.encoder={dim: 48, depth: 2, num_heads: H, patch_size: 8}"
    assert hint in err and err.count("\n") == 1, err
    assert finetune(tmp_path, "e", f"init={foreign}", hint.replace("H", "2"), "data.image_size=32") == 0
    out = capsys.readouterr().out
    assert f"init {foreign}: 28 tensors loaded" in out, out  # every encoder tensor (the final norm: dropped)
