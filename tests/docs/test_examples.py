"""Every ```python block of README.md and docs/*.md runs as written; every relative link resolves; every
`multimae COMMAND` of a bash block is a command and every configs/... path exists; the README's quick
start is the two make commands, on its first screen.

A block runs in a fresh directory that holds small stand-ins for the files it names (a run called
``runs/synthetic-tiny``, official / MAE weights, photos, a tiny depth model, ...), built once per
session. The line before a block may name it, ``<!-- example: NAME -->``: ``EXAMPLES[NAME]`` then
gives what the block needs, textual rewrites that shrink it (each rewrite must match, so a changed
example fails here instead of silently running something else) and checks on what it computed. A
block without a name runs as it is, in an empty directory. ``<!-- not-tested: REASON -->`` skips a
block; keep those few.
"""
from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
sys.path.insert(0, str(REPO / "tests" / "helpers"))

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!--\s*(example|not-tested):\s*(.*?)\s*-->")


@dataclass
class Block:
    file: Path
    line: int
    code: str
    name: str | None  # from <!-- example: NAME -->
    skip: str | None  # from <!-- not-tested: REASON -->

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}" + (f"[{self.name}]" if self.name else "")


def blocks() -> list[Block]:
    out = []
    for f in DOCS:
        text = f.read_text()
        for m in FENCE.finditer(text):
            before = [ln for ln in text[: m.start()].split("\n") if ln.strip()]
            mark = MARK.search(before[-1]) if before else None
            kind, value = (mark.group(1), mark.group(2)) if mark else (None, None)
            out.append(Block(f, text.count("\n", 0, m.start()) + 1, m.group(1),
                             value if kind == "example" else None, value if kind == "not-tested" else None))
    return out


# ----------------------------------------------------------------- the files the examples name
class Workspace:
    """Stand-ins for the runs, weights, photos and models the examples use, each built on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        if name not in self._built:
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            getattr(self, "_" + re.sub(r"\W", "_", name))(path)
            self._built[name] = path
        return self._built[name]

    def link(self, cwd: Path, *names: str) -> None:
        for name in names:
            (cwd / name).parent.mkdir(parents=True, exist_ok=True)
            (cwd / name).symlink_to(self.get(name), target_is_directory=self.get(name).is_dir())

    def _runs_synthetic_tiny(self, path):  # the quick start's run: 64 px, 8 px patches, 6 classes, tiny widths
        from multimae import ModelConfig, MultiMAE
        from multimae.checkpoint import save_checkpoint
        from multimae.core.config import to_dict

        cfg = ModelConfig(preset="nano", dim=32, depth=2, num_heads=2, image_size=64, patch_size=8,
                          modalities={"semseg": {"num_classes": 6}}, decoder_dim=16, decoder_depth=1, decoder_heads=2)
        torch.manual_seed(0)
        save_checkpoint(path, 1, MultiMAE(cfg).state_dict(), {}, {"config": {"model": to_dict(cfg)}, "epoch": 0})

    def _multimae_b_98_rgb__depth_semseg_1600e_pth(self, path):  # official layout; ViT-Ti width, 1 block
        from multimae import ModelConfig, MultiMAE

        cfg = ModelConfig(preset="nano", dim=192, depth=1, num_heads=3, decoder_dim=64, decoder_depth=1, decoder_heads=8)
        torch.manual_seed(0)
        torch.save({"model": MultiMAE(cfg).state_dict()}, path)

    def _mae_pretrain_vit_base_pth(self, path):
        from weights_testutils import mae_state_dict

        torch.save({"model": mae_state_dict(dim=192, depth=1, patch=16, grid=14)}, path)

    def _mae_pretrain_vit_base_full_pth(self, path):
        from weights_testutils import mae_state_dict

        torch.save({"model": mae_state_dict(dim=192, depth=1, patch=16, grid=14, full=True, dec_dim=64)}, path)

    def _runs_ft_semseg_rgb_mae(self, path):  # a 1-step fine-tuning run of the synthetic semseg recipe
        from multimae.cli.main import main

        enc = ("model.encoder={preset: nano, dim: 32, depth: 2, num_heads: 2, patch_size: 8, image_size: 32, "
               "modalities: {semseg: {num_classes: 6}}}")
        assert main(["finetune", "--config", "configs/finetune/synthetic-semseg.yaml", enc, "model.head.embed_dim=64",
                     "data.image_size=32", "data.train_samples=8", "data.val_samples=4", "data.num_workers=0",
                     "train.batch_size=4", "train.eval_batch_size=4", "train.max_steps=1", "train.log_every=1",
                     f"train.out_dir={path.parent}", f"train.run_name={path.name}"]) == 0

    def _seg_onnx(self, path):
        from multimae.cli.main import main

        assert main(["export", "--onnx", str(path), "--checkpoint", str(self.get("runs/ft-semseg-rgb-mae"))]) == 0

    def _photo_jpg(self, path):
        from skimage import data as skdata

        Image.fromarray(skdata.astronaut()[::4, ::6]).save(path, quality=90)  # 128x85, not square

    def _photos(self, path):
        from skimage import data as skdata

        path.mkdir()
        Image.fromarray(skdata.astronaut()[::8, ::8]).save(path / "astronaut.jpg")
        Image.fromarray(skdata.coffee()[::10, ::10]).save(path / "coffee.png")

    def _models_dpt(self, path):
        from multimae.apps.pseudolabel.tiny import save_tiny_dpt

        save_tiny_dpt(path, image_size=32)

    def _data(self, path):  # a folder dataset: data/train/{rgb,depth,semseg,...}/all/
        from multimae.cli.main import main

        assert main(["data", "synthetic", "--out", str(path), "--num", "4", "--size", "32", "--seed", "0",
                     "--format", "folder"]) == 0


# ----------------------------------------------------------------- named examples
@dataclass
class Example:
    needs: tuple[str, ...] = ()  # Workspace entries linked into the directory the block runs in
    rewrites: tuple[tuple[str, str], ...] = ()  # (old, new): each must occur in the block
    namespace: Callable[[], dict] = dict  # names defined before the block runs
    check: Callable[[dict, Path], None] = lambda ns, cwd: None
    monkeypatch: Callable[[pytest.MonkeyPatch, Path], None] = lambda mp, cwd: None


def _check_readme_python(ns, cwd):
    assert ns["preds"]["depth"].shape == (1, 1, 64, 64)
    assert ns["preds"]["semseg"].shape == (1, 6, 16, 16)  # 6 classes at 1/4 resolution
    assert torch.isfinite(ns["preds"]["rgb"]).all()
    with torch.no_grad():  # what the comment says: the prediction from this rgb alone
        want = ns["model"]({"rgb": ns["rgb"]}).preds
    assert set(ns["preds"]) == set(want) and all(torch.equal(ns["preds"][k], want[k]) for k in want)


def _check_model_api(ns, cwd):
    # the model trained one step worth of gradients, then the official file replaced it
    assert ns["out"].preds["semseg"].shape == (2, 133, 16, 16) and ns["out"].loss.ndim == 0
    assert ns["preds"]["depth"].shape == (2, 1, 64, 64)
    assert ns["model"].config.dim == 192  # the official-layout stand-in, architecture read off its shapes


def _check_transfer(ns, cwd):
    assert ns["logits"].shape == (2, 6, 64, 64)
    assert ns["report"].missing and all(k.startswith("head.") for k in ns["report"].missing)


def _check_predict(ns, cwd):
    assert ns["out"]["semseg"].shape == (6, 128, 86)  # logits at the photo's size (height, width)


def _check_weights(ns, cwd):
    assert sorted(p.name for p in (cwd / "synthetic-tiny-mm").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert ns["enc"].config.image_size == 384 and ns["enc"].config.inputs == ["rgb"] and ns["enc"].config.outputs == []
    assert ns["mae"].config.encoder_norm and ns["mae"].config.inputs == ["rgb"]
    assert ns["start"].config.outputs == ["rgb", "depth", "semseg"]


def _fake_hub(mp: pytest.MonkeyPatch, cwd: Path) -> None:
    """No network in tests: the Hub is a local directory (upload copies into it, download returns it)."""
    import huggingface_hub

    hub = cwd / "hub"

    class FakeApi:
        def upload_folder(self, repo_id, folder_path, **kw):
            shutil.copytree(folder_path, hub / repo_id)

    mp.setattr(huggingface_hub, "HfApi", FakeApi)
    mp.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(hub / repo_id))


def _hub_namespace():
    from multimae import MultiMAE

    return {"MultiMAE": MultiMAE}


def _check_hub(ns, cwd):
    assert (cwd / "hub" / "you" / "multimae-synthetic-tiny" / "README.md").is_file()
    assert ns["model"].config.image_size == 64


def _onnx_namespace():
    return {"rgb": np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)}


def _check_onnx(ns, cwd):
    assert ns["logits"].shape == (3, 6, 32, 32) and np.isfinite(ns["logits"]).all()


def _check_pseudolabel(ns, cwd):
    out = cwd / "data" / "mydata" / "train"
    for task in ("rgb", "depth", "semseg"):
        assert sorted(p.stem for p in (out / task / "all").iterdir()) == ["astronaut", "coffee"], task
    with Image.open(out / "semseg" / "all" / "coffee.png") as im:
        assert set(np.unique(np.asarray(im))) <= {0, 1}  # Brightness: dark / bright
    assert "2" in ns["report"].summary()


def _check_synthetic(ns, cwd):
    assert ns["sample"]["rgb"].shape == (3, 224, 224) and ns["sample"]["semseg"].max() < len(ns["SEMSEG_CLASSES"])


def _check_folder(ns, cwd):
    assert len(ns["ds"]) == 4 and set(ns["ds"][0]) >= {"rgb", "depth", "semseg"}


def _check_shards(ns, cwd):
    assert len(ns["paths"]) == 5 and len(ns["ds"]) == 25
    assert ns["batch"]["rgb"].shape[1:] == (3, 32, 32) and ns["batch"]["semseg"].shape[1:] == (8, 8)


EXAMPLES: dict[str, Example] = {
    "readme-python": Example(needs=("runs/synthetic-tiny",), check=_check_readme_python),
    "model-api": Example(
        needs=("multimae-b_98_rgb+-depth-semseg_1600e.pth",),
        rewrites=(('preset="base"', 'preset="nano"'), ("224", "64"), ("56, 56", "16, 16"), ("num_visible=98", "num_visible=12")),
        check=_check_model_api),
    "transfer": Example(needs=("runs/synthetic-tiny",), check=_check_transfer,
                        namespace=lambda: {"rgb": torch.randn(2, 3, 64, 64), "depth": torch.randn(2, 1, 64, 64)}),
    "predictor": Example(needs=("runs/ft-semseg-rgb-mae", "photo.jpg"), check=_check_predict),
    "weights": Example(needs=("runs/synthetic-tiny", "multimae-b_98_rgb+-depth-semseg_1600e.pth",
                              "mae_pretrain_vit_base.pth", "mae_pretrain_vit_base_full.pth"), check=_check_weights),
    "hub": Example(needs=("runs/synthetic-tiny",), monkeypatch=_fake_hub, namespace=_hub_namespace, check=_check_hub),
    "onnx": Example(needs=("seg.onnx",), namespace=_onnx_namespace, check=_check_onnx),
    "labeler": Example(needs=("photos", "models/dpt"), check=_check_pseudolabel),
    "synthetic": Example(check=_check_synthetic),
    "folder": Example(needs=("data",), check=_check_folder),
    "shards": Example(rewrites=(("5000, 256", "25, 32"), ("max_count=1000", "max_count=5"), ("224", "32"),
                                ("batch_size=64, num_workers=8", "batch_size=8, num_workers=0")),
                      check=_check_shards),
}
# a block that needs another one's names first
BEFORE = {"hub": "weights"}

ALL = blocks()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("doc-workspace"))


def _run(block: Block, cwd: Path, ws: Workspace, monkeypatch, ns: dict | None = None) -> dict:
    assert block.name is None or block.name in EXAMPLES, f"{block.id}: no EXAMPLES[{block.name!r}] in this test"
    ex = EXAMPLES[block.name] if block.name else Example()
    monkeypatch.chdir(REPO)  # workspace builders use repository config paths
    for name in ex.needs:
        if not (cwd / name).exists():
            ws.link(cwd, name)
    monkeypatch.chdir(cwd)
    ex.monkeypatch(monkeypatch, cwd)
    code = block.code
    for old, new in ex.rewrites:
        assert old in code, f"{block.id}: the test rewrites {old!r}, which the example no longer contains"
        code = code.replace(old, new)
    ns = {**(ns or {}), **ex.namespace()}
    exec(compile(code, str(block.file), "exec"), ns)
    ex.check(ns, cwd)
    return ns


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_example_runs(block, workspace, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(f"marked not-tested: {block.skip}")
    ns = None
    if block.name in BEFORE:  # e.g. the Hub example uploads the directory the weights example saved
        (first,) = [b for b in ALL if b.name == BEFORE[block.name]]
        ns = _run(first, tmp_path, workspace, monkeypatch)
    _run(block, tmp_path, workspace, monkeypatch, ns)


def test_every_named_example_exists_once_and_skips_are_few():
    names = [b.name for b in ALL if b.name]
    assert sorted(names) == sorted(EXAMPLES), "EXAMPLES and the <!-- example: NAME --> markers differ"
    assert all(b.skip.strip() for b in ALL if b.skip is not None), "a not-tested marker must give its reason"
    assert sum(b.skip is not None for b in ALL) <= 2, "keep untested examples few"
    assert any(b.file.name == "README.md" for b in ALL)


# ----------------------------------------------------------------- links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(md: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped except '-' and '_', spaces to '-'."""
    out = set()
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)
    for h in re.findall(r"^#{1,6} +(.+?) *$", text, re.M):
        out.add(re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("md", DOCS, ids=[str(f.relative_to(REPO)) for f in DOCS])
def test_relative_links_resolve(md):
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{md.relative_to(REPO)}: broken links:\n" + "\n".join(bad)


# ----------------------------------------------------------------- commands
BASH = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
QUICK_START = ("make run     # set up, pretrain on synthetic scenes (~5 min on 2 CPU cores), evaluate, draw the figure\n"
               "make test    # set up (incl. Debian chromium for the demo's browser test), run the test suite "
               "(~8 min on 2 CPU cores)\n")


def test_quick_start_is_on_the_first_screen_and_its_targets_exist():
    text = (REPO / "README.md").read_text()
    first = BASH.search(text)
    assert first.group(1) == QUICK_START
    assert text.count("\n", 0, first.end()) < 40, "the quick start must stay within the README's first 40 lines"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_documented_commands_and_configs_exist():
    from multimae.cli.main import build_parser
    from multimae.core.config import resolve_config_path

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    bad = []
    for md in DOCS:
        text = md.read_text()
        for path in set(re.findall(r"\bconfigs/(?:pretrain|finetune)/[\w.-]+\.yaml\b", text)):
            if not Path(path).stem.isupper() and not (REPO / path).is_file():  # NAME / TASK: placeholders
                bad.append(f"{md.name}: {path} does not exist")
        for block in BASH.findall(text):
            for line in block.replace("\\\n", " ").split("\n"):
                for cmd in re.findall(r"(?:^|[\s(])multimae (\w[\w-]*)", line.split("#", 1)[0]):
                    if cmd not in sub.choices:
                        bad.append(f"{md.name}: `multimae {cmd}` is no command ({line.strip()[:80]})")
                for name in re.findall(r"--config ([\w-]+)(?:\s|$)", line):
                    try:
                        resolve_config_path(name)
                    except Exception as e:  # noqa: BLE001 - reported below
                        bad.append(f"{md.name}: --config {name}: {e}")
    assert not bad, "\n".join(bad)
