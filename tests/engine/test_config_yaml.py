"""Typed dataclass configs: YAML, dotted overrides, inheritance and error messages."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

from multimae.core.config import ConfigError, from_dict, load_config, load_yaml, parse_value, save_json, to_dict


@dataclass
class Optim:
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.95)
    layer_decay: Optional[float] = None


@dataclass
class Data:
    modalities: list[str] = field(default_factory=lambda: ["rgb"])
    image_size: int = 224
    kind: Literal["synthetic", "folder"] = "synthetic"
    root: Path | None = None


@dataclass
class Run:
    name: str = "run"
    seed: int = 0
    amp: bool = False
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)
    loss_weights: dict[str, float] = field(default_factory=dict)
    extra: Any = None
    finetune: Optional[Optim] = None


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    cfg = load_config(Run)
    assert cfg == Run()


def test_yaml_and_overrides(tmp_path: Path) -> None:
    f = write(tmp_path / "a.yaml", "name: a\noptim:\n  lr: 3e-4\ndata:\n  image_size: 64\n")
    cfg = load_config(
        Run,
        f,
        [
            "optim.weight_decay=0",
            "amp=true",
            "data.modalities=[rgb,depth]",
            "loss_weights.depth=2",
            "optim.betas=[0.9,0.999]",
            "data.root=/x/y",
            "finetune.lr=1e-3",
        ],
    )
    assert cfg.name == "a"
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.amp is True
    assert cfg.data.modalities == ["rgb", "depth"]
    assert cfg.data.image_size == 64
    assert cfg.loss_weights == {"depth": 2.0}
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.data.root == Path("/x/y")
    assert isinstance(cfg.finetune, Optim) and cfg.finetune.lr == pytest.approx(1e-3)


def test_parse_value() -> None:
    assert parse_value("1e-4") == pytest.approx(1e-4)
    assert parse_value("true") is True
    assert parse_value("[a, b]") == ["a", "b"]
    assert parse_value("12") == 12
    assert parse_value("null") is None


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(Run, overrides=["optim.lrr=1"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "did you mean 'optim.lr'" in msg
    assert "weight_decay" in msg  # valid keys listed
    f = write(tmp_path / "b.yaml", "dataa:\n  image_size: 3\n")
    with pytest.raises(ConfigError, match=r"'dataa'.*did you mean 'data'"):
        load_config(Run, f)


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("seed=abc", "seed", "int"),
        ("seed=1.5", "seed", "int"),
        ("amp=1", "amp", "bool"),
        ("optim.lr=fast", "optim.lr", "float"),
        ("optim.lr=true", "optim.lr", "float"),
        ("data.kind=webdataset", "data.kind", "Literal"),
        ("data.modalities=rgb", "data.modalities", "list"),
        ("data.modalities=[rgb,3]", "data.modalities[1]", "str"),
        ("loss_weights.depth=x", "loss_weights.depth", "float"),
        ("optim=3", "optim", "Optim"),
    ],
)
def test_wrong_type_names_key_type_value(override: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(Run, overrides=[override])
    msg = str(e.value)
    assert f"'{key}'" in msg and expected in msg
    value = override.split("=", 1)[1].strip("[]").split(",")[-1]
    assert value.lower() in msg.lower()


def test_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a.b.c=value"):
        load_config(Run, overrides=["optim.lr"])
    f = write(tmp_path / "n.yaml", "name: a\n")
    with pytest.raises(ConfigError, match="'name' is str"):
        load_config(Run, f, ["name.x=1"])
    with pytest.raises(ConfigError, match="'name'.*expected str.*dict"):
        load_config(Run, overrides=["name.x=1"])


def test_defaults_inheritance(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    write(
        tmp_path / "base" / "root.yaml",
        "seed: 1\noptim:\n  lr: 1.0e-3\n  weight_decay: 0.1\ndata:\n  modalities: [rgb, depth]\n",
    )
    write(tmp_path / "mid.yaml", "defaults: base/root.yaml\nseed: 2\noptim:\n  lr: 5e-4\n")
    child = write(tmp_path / "child.yaml", "defaults: mid.yaml\nname: child\n")
    cfg = load_config(Run, child, ["seed=3"])
    assert cfg.name == "child"
    assert cfg.seed == 3  # override > child > mid > root
    assert cfg.optim.lr == pytest.approx(5e-4)  # mid wins over root
    assert cfg.optim.weight_decay == pytest.approx(0.1)  # deep merge keeps root's sibling key
    assert cfg.data.modalities == ["rgb", "depth"]


def test_defaults_cycle_and_missing(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "defaults: b.yaml\n")
    write(tmp_path / "b.yaml", "defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(Run, a)
    c = write(tmp_path / "c.yaml", "defaults: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(Run, c)


def test_yaml_parse_error_names_file(tmp_path: Path) -> None:
    f = write(tmp_path / "broken.yaml", "optim: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(Run, f)
    g = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_config(Run, g)


def test_to_dict_from_dict_round_trip(tmp_path: Path) -> None:
    cfg = load_config(Run, overrides=["data.root=/r", "extra={a: [1, 2]}", "finetune.lr=2e-3"])
    d = to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert d["optim"]["betas"] == [0.9, 0.95] and d["data"]["root"] == "/r"
    assert from_dict(Run, d) == cfg
    p = save_json(cfg, tmp_path / "sub" / "config.json")
    assert from_dict(Run, json.loads(p.read_text())) == cfg
    assert not [x for x in p.parent.iterdir() if x.name.startswith(".tmp")]


def test_from_dict_validates() -> None:
    with pytest.raises(ConfigError, match="'optim.betas\\[1\\]'.*float"):
        from_dict(Run, {"optim": {"betas": [0.9, "x"]}})


@dataclass
class Required:
    depth: int
    dim: int = 8

    def __post_init__(self) -> None:
        if self.depth <= 0:
            raise ValueError(f"depth must be positive, got {self.depth}")


@dataclass
class Outer:
    model: Required


def test_missing_required_and_post_init() -> None:
    with pytest.raises(ConfigError, match="missing required config key 'model.depth'"):
        from_dict(Outer, {"model": {}})
    with pytest.raises(ConfigError, match="model.*depth must be positive"):
        from_dict(Outer, {"model": {"depth": 0}})
    assert from_dict(Outer, {"model": {"depth": 2}}).model == Required(2)


def _alias_bomb(levels: int = 9) -> str:
    """The classic "billion laughs": 9 levels of 9 aliases each, 9**9 strings, ~330 bytes."""
    parts, prev = ["&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"], "a"
    for name in "bcdefghijk"[:levels - 1]:
        parts.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "train: {run_name: [" + ", ".join(parts) + "]}\n"


def test_yaml_alias_bomb_fails_fast_in_little_memory(tmp_path, capsys):
    import tracemalloc

    from multimae.cli.main import main

    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    assert len(path.read_bytes()) < 440
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="expand to more than 100000 values"):
            load_yaml(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20e6  # refused after a bounded expansion, not after building the whole document
    assert main(["pretrain", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "alias bomb" in err and str(path) in err and len(err) < 400
    (tmp_path / "loop.yaml").write_text("train: &t {x: *t}\n")
    with pytest.raises(ConfigError, match="refers to a node that contains it"):
        load_yaml(tmp_path / "loop.yaml")


def test_a_big_wrong_value_is_shown_short(tmp_path):
    from multimae.tasks.pretrain_config import PretrainConfig

    path = tmp_path / "big.yaml"
    path.write_text(_alias_bomb(5))  # 9**5 = 59049 values: under the bound, but no run name
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, path)
    assert "train.run_name" in str(err.value) and len(str(err.value)) < 400
