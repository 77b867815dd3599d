"""``data.eval_split`` is the split a fine-tune, a linear probe and ``multimae evaluate`` score;
``data.split`` (pretraining's training split) is read as it there, with a FutureWarning."""
import warnings
from pathlib import Path

import pytest

from multimae.core.config import ConfigError, load_config
from multimae.tasks.finetune_config import FinetuneConfig
from multimae.tasks.pretrain_config import PretrainConfig


@pytest.mark.parametrize("path", sorted(Path("configs/finetune").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_name_the_evaluated_split_eval_split(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shipped config spells it the old way
        cfg = load_config(FinetuneConfig, path)
    assert cfg.data.eval_split in ("val", "test")
    if path.stem.startswith("nyuv2"):
        assert cfg.data.eval_split == "test"  # NYUv2 has no val split (official: scored on test)


def test_an_old_data_split_override_is_read_as_eval_split_with_a_warning() -> None:
    with pytest.warns(FutureWarning, match=r"'data.split' is now 'data.eval_split'.*data.eval_split='test' "
                                           r"over data.eval_split='val'"):
        cfg = load_config(FinetuneConfig, "configs/finetune/synthetic-cls.yaml", ["data.split=test"])
    assert cfg.data.eval_split == "test" and cfg.data.train_split == "train"


def test_an_old_data_split_in_a_users_yaml_is_read_as_eval_split(tmp_path) -> None:
    y = tmp_path / "mine.yaml"
    y.write_text(f"defaults: {Path('configs/finetune/synthetic-cls.yaml').resolve()}\ndata:\n  split: test\n")
    with pytest.warns(FutureWarning, match="data.eval_split"):
        assert load_config(FinetuneConfig, y).data.eval_split == "test"


def test_a_bad_old_data_split_is_reported_under_its_new_name() -> None:
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="'data.eval_split': expected str"):
        load_config(FinetuneConfig, None, ["data.split=[a,b]"])


def test_pretraining_keeps_data_split_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml", ["data.split=trainval"])
    assert cfg.data.split == "trainval"
    with pytest.raises(ConfigError, match="unknown config key 'data.eval_split'"):
        load_config(PretrainConfig, None, ["data.eval_split=val"])
