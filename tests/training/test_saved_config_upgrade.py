"""Run configs saved by earlier versions still load (visualize / demo / pseudolabel read them)."""
import pytest

from multimae.config import ConfigError, from_dict, to_dict
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
