"""Downstream samples: letterboxed dense evaluation, folder layouts, bad labels named."""
import pytest
import torch

from multimae.core.config import load_config
from multimae.data.transfer import TransferTransform, target_spec
from multimae.data.errors import DataError
from multimae.core.modalities import get
from multimae.tasks.finetune_config import FinetuneConfig
from multimae.tasks.finetune_data import build_eval_loader, build_train_loader


def _raw(h=24, w=16, cls=2):
    g = torch.Generator().manual_seed(0)
    return {"rgb": torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g),
            "depth": torch.rand(1, h, w, generator=g) + 1.0, "semseg": torch.full((h, w), cls, dtype=torch.int64),
            "__key__": "x"}


def test_dense_evaluation_letterboxes_and_marks_padding():
    raw = _raw()
    seg = TransferTransform([get("rgb")], "semseg", target_spec("semseg", "segmentation", 6), 24, train=False,
                            letterbox_eval=True, ignore_index=255)(raw)
    assert seg["rgb"].shape == (3, 24, 24) and seg["target"].shape == (24, 24)
    assert (seg["target"][:, :16] == 2).all() and (seg["target"][:, 16:] == 255).all()  # padding is ignored
    dep = TransferTransform([get("rgb")], "depth", target_spec("depth", "depth"), 24, train=False,
                            letterbox_eval=True)(raw)
    assert dep["target_valid"][0, :, :16].all() and not dep["target_valid"][0, :, 16:].any()
    assert torch.allclose(dep["target"][0, :, :16], raw["depth"][0])  # metres, never standardised


def test_segmentation_label_outside_the_classes_is_named():
    raw = _raw(cls=9)
    tf = TransferTransform([get("rgb")], "semseg", target_spec("semseg", "segmentation", 6), 16, train=False)
    with pytest.raises(DataError, match="sample x.*class id 9"):
        tf(raw)


def test_folder_classification_layout(tmp_path):
    """root/<split>/rgb/<class>/<name> with depth beside it; labels from the class directories."""
    from multimae.data.folder import write_folder
    from multimae.data.synthetic import LABEL_CLASSES, SyntheticScenes

    for split, seed in (("train", 3), ("val", 4)):
        write_folder(SyntheticScenes(8, 32, seed=seed, modalities=["rgb", "depth", "label"]), tmp_path, split,
                     classes=LABEL_CLASSES)
    cfg = load_config(FinetuneConfig, "configs/finetune/synthetic-cls.yaml", [
        "data.source=folder", f"data.root={tmp_path}", "data.image_size=32", "data.num_workers=0",
        "model.inputs=[rgb,depth]", "train.batch_size=4", "train.eval_batch_size=8"])
    specs = [get("rgb"), get("depth")]
    batch = next(iter(build_eval_loader(cfg, specs)))
    want = {f"{LABEL_CLASSES[int(s['label'])]}/{s['__key__']}": int(s["label"])
            for s in SyntheticScenes(8, 32, seed=4, modalities=["label"])}
    assert dict(zip(batch.extra["__key__"], batch["target"].tolist())) == want
    assert batch["rgb"].shape == (8, 3, 32, 32) and batch["depth"].shape == (8, 1, 32, 32)
    loader, position = build_train_loader(cfg, specs)
    per_epoch = len(position)
    (b, _), = [next(iter(loader))]
    assert per_epoch == 2 and b["target"].shape == (4,) and "__batch__" not in b and "__batch__" not in b.extra
