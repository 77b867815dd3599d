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
