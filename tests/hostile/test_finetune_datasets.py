"""Hostile fine-tuning datasets through the CLI: every case is a one-line error naming the file or
directory before training starts, or it trains with a notice; `data.on_error=skip` skips every
per-sample error of fine-tuning."""
import json
import logging

import numpy as np

from multimae.core.config import load_config
from multimae.core.modalities import get
from multimae.tasks.finetune_config import FinetuneConfig
from multimae.tasks.finetune_data import build_eval_loader
from finetune_trees import SEG, TINY, cls_tree, finetune, png, seg_tree  # tests/helpers


def _err(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_eval_labels_index_the_training_classes(tmp_path):
    """val lacks class 'a': its samples keep the training split's indices (b=1, c=2), not (0, 1)."""
    cls_tree(tmp_path, {"train": {"a": 2, "b": 2, "c": 2}, "val": {"b": 1, "c": 1}})
    cfg = load_config(FinetuneConfig, "configs/finetune/folder-cls.yaml",
                      TINY + [f"data.root={tmp_path}", "model.head.num_classes=3"])
    batch = next(iter(build_eval_loader(cfg, [get("rgb")])))
    assert dict(zip(batch.extra["__key__"], batch["target"].tolist())) == {"b/b0": 1, "c/c0": 2}


def test_unknown_eval_class_is_named_before_training(tmp_path, capsys):
    cls_tree(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "z": 1}})
    assert finetune(tmp_path, "folder-cls", tmp_path, "model.head.num_classes=2") == 2
    line = _err(capsys)
    assert str(tmp_path / "val" / "rgb" / "z") in line and "training split" in line
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists()


def test_more_class_directories_than_num_classes(tmp_path, capsys):
    cls_tree(tmp_path, {"train": {c: 1 for c in "abcde"}, "val": {"a": 1}})
    assert finetune(tmp_path, "folder-cls", tmp_path, "model.head.num_classes=3") == 2
    line = _err(capsys)
    assert "5 class directories" in line and "model.head.num_classes=3" in line and str(tmp_path) in line


def test_missing_eval_split_fails_before_the_first_step(tmp_path, capsys):
    seg_tree(tmp_path, ["train"])
    assert finetune(tmp_path, "folder-semseg", tmp_path, *SEG) == 2  # folder-semseg scores data.eval_split=test
    line = _err(capsys)
    assert str(tmp_path / "test") in line
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists()  # no step was taken


def test_empty_class_directory_trains_with_a_notice(tmp_path, caplog):
    cls_tree(tmp_path, {"train": {"a": 2, "b": 0, "c": 2}, "val": {"a": 1, "c": 1}})
    (tmp_path / "train" / "rgb" / "b").mkdir(parents=True, exist_ok=True)
    with caplog.at_level(logging.WARNING, logger="multimae.data"):
        assert finetune(tmp_path, "folder-cls", tmp_path, "model.head.num_classes=3") == 0
    assert any("empty class directory" in r.getMessage() and str(tmp_path / "train" / "rgb" / "b") in r.getMessage()
               for r in caplog.records)
    cfg = load_config(FinetuneConfig, "configs/finetune/folder-cls.yaml",
                      TINY + [f"data.root={tmp_path}", "model.head.num_classes=3"])
    batch = next(iter(build_eval_loader(cfg, [get("rgb")])))
    assert dict(zip(batch.extra["__key__"], batch["target"].tolist())) == {"a/a0": 0, "c/c0": 2}  # b keeps index 1


def test_semseg_id_out_of_range_names_the_file_and_is_skippable(tmp_path, capsys):
    seg_tree(tmp_path, ["train", "test"])
    bad = tmp_path / "train" / "semseg" / "all" / "s1.png"
    png(bad, np.full((32, 32), 7, np.uint8))  # 7 >= num_classes 4, and not the ignore index 255
    png(tmp_path / "train" / "semseg" / "all" / "s2.png", np.full((32, 32), 255, np.uint8))  # ignore: fine
    assert finetune(tmp_path, "folder-semseg", tmp_path, *SEG, "data.on_error=raise") == 2
    line = _err(capsys)
    assert str(bad) in line and "class id 7" in line and "ignore index 255" in line
    assert finetune(tmp_path, "folder-semseg", tmp_path, *SEG, "data.on_error=skip", "train.run_name=s") == 0


def test_on_error_skip_skips_every_per_sample_error(tmp_path, caplog):
    """A corrupt image, a map of another size and a bad class id in one fine-tuning folder: skip
    counts each and trains; raise names the first file."""
    seg_tree(tmp_path, ["train", "test"], n=6)
    (tmp_path / "train" / "rgb" / "all" / "s0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    png(tmp_path / "train" / "semseg" / "all" / "s1.png", np.zeros((16, 16), np.uint8))
    png(tmp_path / "train" / "semseg" / "all" / "s2.png", np.full((32, 32), 9, np.uint8))
    with caplog.at_level(logging.WARNING, logger="multimae.data"):
        assert finetune(tmp_path, "folder-semseg", tmp_path, *SEG, "data.on_error=skip", "train.max_steps=3") == 0
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad sample")]
    for name, what in (("rgb/all/s0.png", "truncated or not an image"), ("s1", "different sizes"),
                       ("semseg/all/s2.png", "class id 9")):
        assert any(name in m and what in m for m in skipped), (name, skipped)


def test_folder_classification_takes_its_classes_and_keeps_their_names(tmp_path, capsys):
    """folder-cls (num_classes: null) on a 4-class folder: a 4-way head, the names in the run's
    config, classification.jsonl and the ONNX metadata; a num_classes that disagrees is one line."""
    from multimae.apps.predict import Predictor, predict_files

    classes = ["cat", "dog", "eel", "fox"]
    cls_tree(tmp_path, {"train": {c: 1 for c in classes}, "val": {c: 1 for c in classes}})
    assert finetune(tmp_path, "folder-cls", tmp_path, "model.head.num_classes=1000") == 2
    line = _err(capsys)
    assert "4 class directories" in line and "model.head.num_classes=1000" in line and "null" in line
    assert finetune(tmp_path, "folder-cls", tmp_path) == 0
    run = tmp_path / "runs" / "r"
    pred = Predictor.from_run(run, device="cpu")
    assert pred.outputs["label"].classes == classes
    r = predict_files(pred, tmp_path / "val" / "rgb" / "dog", tmp_path / "o", progress=False)
    assert r.predicted == 1
    rec = json.loads((tmp_path / "o" / "classification.jsonl").read_text().splitlines()[0])
    assert len(rec["top"]) == 4 and {t["name"] for t in rec["top"]} == set(classes)
    from multimae.apps.export import load_exportable

    assert load_exportable(run)[1]["classes"] == classes  # written as the ONNX file's multimae.classes
