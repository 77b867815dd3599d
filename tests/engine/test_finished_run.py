"""A finished pretraining run as a user meets it: loaded with the public loader, and drawn by
``multimae visualize`` on the user's own image file."""
import numpy as np
import pytest
import torch
from PIL import Image

from multimae import MultiMAE
from multimae.checkpoint import find_latest, list_checkpoints, load_weights
from multimae.cli.main import main
from multimae.core.config import load_config
from multimae.tasks.pretrain_config import PretrainConfig
from multimae.engine.trainer import Trainer
from multimae.tasks.pretrain import PretrainTask
from tiny import TINY_OVERRIDES

SMALL = TINY_OVERRIDES + [
         "data.num_samples=16", "data.num_workers=0", "data.cache=false", "mask.num_visible=12", "optim.lr=1e-3",
         "optim.warmup_steps=1", "train.batch_size=8", "train.max_steps=4", "train.ckpt_every=2",
         "train.figure_at_end=false", "train.resume=null", "model.loss_weights={semseg: 0.5}"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    trainer = Trainer(PretrainTask(load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml",
                                  SMALL + [f"train.out_dir={out}", "train.run_name=done"])))
    return trainer, trainer.fit()


def test_public_loader_gives_the_final_weights_of_a_finished_run(finished):
    trainer, run = finished
    assert len(list_checkpoints(run)) == 2  # steps 2 and 4: the loader must take the last
    model = MultiMAE.from_pretrained(run)
    assert not model.training and model.config == trainer.model.config
    assert model.config.loss_weights == {"semseg": 0.5}
    final = trainer.model.state_dict()
    got = model.state_dict()
    assert set(got) == set(final) and all(torch.equal(got[k], final[k]) for k in final)
    assert set(load_weights(find_latest(run))) == set(final)
    batch = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32), "semseg": torch.randint(0, 6, (2, 8, 8))}
    trainer.model.eval()
    with torch.no_grad():
        want, have = trainer.model(batch).preds, model(batch).preds
    assert all(torch.equal(want[t], have[t]) for t in want)


def test_visualize_on_a_users_own_image(finished, tmp_path):
    _, run = finished
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)  # not square, not the model's size
    img[:, :35] = (200, 30, 30)
    path = tmp_path / "my photo.png"
    Image.fromarray(img).save(path)
    out = tmp_path / "fig.png"
    assert main(["visualize", "--checkpoint", str(run), "--input", str(path), "--out", str(out)]) == 0
    fig = np.asarray(Image.open(out).convert("RGB"))
    # 2 rows (random masks, rgb only), each a 14 px title over 96 px tiles with 2 px borders;
    # 3 tiles (masked input, prediction, target) per task: rgb, depth, semseg
    assert fig.shape == (2 * (14 + 96 + 4), 3 * 3 * (96 + 4), 3)
    # the rgb target tile is the user's image, centre-cropped to a square: red on its left part
    target = fig[14 + 2 + 48:14 + 2 + 96, 2 * 100 + 2:2 * 100 + 98].astype(int)
    left, right = target[:, 5:20], target[:, 70:90]
    assert (np.abs(left - (200, 30, 30)) <= 12).all() and not (np.abs(right - (200, 30, 30)) <= 12).all()
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    assert main(["visualize", "--checkpoint", str(run), "--input", str(bad), "--out", str(tmp_path / "x.png")]) == 2
