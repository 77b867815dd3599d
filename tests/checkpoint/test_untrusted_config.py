"""An untrusted ``config.json`` beside weights (or any ModelConfig) is checked before anything is
allocated: sizes bounded and positive, divisibility, and agreement with the weights' safetensors
header; each failure is one line naming the file, the key and the value."""
import json
import resource

import pytest
import torch

from multimae.cli.main import main
from multimae.core.config import ConfigError
from multimae.model.multimae import MultiMAE
from multimae.model.config import ModelConfig
import tiny

TINY = dict(tiny.TINY, image_size=16, decoder_dim=32, decoder_depth=1, decoder_heads=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("w") / "tiny"
    torch.manual_seed(0)
    MultiMAE(ModelConfig(**TINY)).save_pretrained(d)
    return d


def _tampered(saved, tmp_path, **model):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(saved, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"].update(model)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("change, words", [
    (dict(depth=10**9), "model.depth = 1000000000: must be in 1..256"),
    (dict(depth=1e9), "depth"),
    (dict(dim=0), "model.dim = 0: must be in 1..16384"),
    (dict(dim=-8), "model.dim = -8"),
    (dict(num_heads=3), "model.dim = 32: must be divisible by model.num_heads = 3"),
    (dict(image_size=20), "model.image_size = 20: must be a multiple of model.patch_size = 8"),
    (dict(modalities={"semseg": {"num_classes": 10**12}}), "model.modalities.semseg.num_classes = 1000000000000"),
    (dict(depth=3), "model.depth = 3 but the weights hold 2 encoder blocks"),
    (dict(dim=64, num_heads=2), "model.dim = 64, model.num_global_tokens = 1 but the weights' global_tokens"),
    (dict(depth=200, dim=4096, num_heads=16), "model.dim = 4096"),
])
def test_bad_config_json_is_one_line_before_any_allocation(saved, tmp_path, capsys, change, words):
    d = _tampered(saved, tmp_path, **change)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the process's high-water mark
    rc = main(["convert", str(d), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and str(d / "config.json") in err and err.count("\n") == 1, err
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 512 * 1024 and not (tmp_path / "out").exists()  # refused before building the model


def test_model_config_from_a_yaml_run_is_checked_too():
    with pytest.raises(ConfigError, match="model.decoder_dim = 30: must be divisible by model.decoder_heads = 4"):
        MultiMAE(ModelConfig(**{**TINY, "decoder_dim": 30, "decoder_heads": 4}))
    with pytest.raises(ConfigError, match=r"~825B parameters, over the limit of 50B"):
        MultiMAE(ModelConfig(**{**TINY, "dim": 16384, "num_heads": 16, "depth": 256}))
    with pytest.raises(ConfigError, match=r"model.mlp_ratio = 0"):
        MultiMAE(ModelConfig(**{**TINY, "mlp_ratio": 0}))


def test_pretrain_cli_refuses_a_huge_depth_fast(tmp_path, capsys):
    rc = main(["pretrain", "--config", "configs/pretrain/synthetic-tiny.yaml", "model.depth=1000000000",
               f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.depth = 1000000000: must be in 1..256" in err and "Traceback" not in err


def test_bad_safetensors_files_name_the_file(saved, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not js}")
    for args in (["convert", str(bad), str(tmp_path / "o.safetensors"), "--to", "timm"],
                 ["convert", str(bad), str(tmp_path / "o")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{bad}: not a readable safetensors file" in err and err.count("\n") == 1, err
    with pytest.raises(Exception, match=str(bad)):
        MultiMAE.from_pretrained(bad)
    import shutil

    d = tmp_path / "dir"
    shutil.copytree(saved, d)
    (d / "model.safetensors").write_bytes(b"garbage")
    assert main(["convert", str(d), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert str(d / "model.safetensors") in err and err.count("\n") == 1, err
