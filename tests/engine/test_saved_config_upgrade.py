"""Run configs saved by earlier versions still load (visualize / demo / pseudolabel read them)."""
import pytest

from multimae.core.config import ConfigError, from_dict, to_dict
from multimae.tasks.pretrain_config import PretrainConfig, upgrade_saved_config


def test_train_attention_of_an_old_run_becomes_model_attention() -> None:
    old = to_dict(PretrainConfig())
    old["model"].pop("attention")
    old["train"]["attention"] = "manual"
    with pytest.raises(ConfigError, match="train.attention"):
        from_dict(PretrainConfig, old)
    cfg = from_dict(PretrainConfig, upgrade_saved_config(old))
    assert cfg.model.attention == "manual"
    assert "attention" in old["train"]  # the caller's dict is not changed


def test_current_configs_pass_through_unchanged() -> None:
    cfg = PretrainConfig()
    cfg.model.attention = "fused"
    assert from_dict(PretrainConfig, upgrade_saved_config(to_dict(cfg))) == cfg


def test_a_fine_tuning_run_saved_with_train_attention_loads_with_model_attention() -> None:
    """Fine-tuning's attention kernel is ``model.attention`` too (it was ``train.attention``)."""
    from multimae.tasks.finetune_config import FinetuneConfig

    old = to_dict(FinetuneConfig())
    old["model"].pop("attention")
    old["train"]["attention"] = "manual"
    with pytest.raises(ConfigError, match="train.attention"):
        from_dict(FinetuneConfig, old)
    assert from_dict(FinetuneConfig, upgrade_saved_config(old)).model.attention == "manual"


def _old_finetune(split: str = "test") -> dict:
    """A fine-tuning run's saved config as written before ``data.eval_split``: its evaluated split
    under ``data.split`` (the keys of meta.json's ``config``: init, model.head, data.train_split)."""
    from multimae.tasks.finetune_config import FinetuneConfig

    old = to_dict(FinetuneConfig())
    old["data"].pop("eval_split")
    old["data"]["split"] = split
    return old


def test_a_fine_tuning_run_saved_with_data_split_loads_with_eval_split_and_no_warning() -> None:
    import warnings

    from multimae.tasks.finetune_config import FinetuneConfig

    old = _old_finetune("test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a saved run was written by the library: nothing to warn about
        cfg = from_dict(FinetuneConfig, upgrade_saved_config(old))
    assert cfg.data.eval_split == "test" and cfg.data.train_split == "train"
    assert old["data"]["split"] == "test" and "eval_split" not in old["data"]  # the caller's dict is not changed


@pytest.mark.parametrize("marker", ["init", "train_split", "head"])
def test_each_mark_of_a_transfer_config_is_enough(marker: str) -> None:
    """A probe's or an abridged fine-tuning config is recognised by any one of its keys."""
    d = {"init": {"init": "runs/x", "data": {"split": "test"}},
         "train_split": {"data": {"train_split": "train", "split": "test"}},
         "head": {"model": {"head": {"kind": "classification"}}, "data": {"split": "test"}}}[marker]
    up = upgrade_saved_config(d)
    assert up["data"]["eval_split"] == "test" and "split" not in up["data"]


def test_a_pretraining_config_keeps_data_split_its_training_split() -> None:
    old = to_dict(PretrainConfig())
    old["data"]["split"] = "trainval"
    up = upgrade_saved_config(old)
    assert up["data"]["split"] == "trainval" and "eval_split" not in up["data"]
    assert from_dict(PretrainConfig, up).data.split == "trainval"
