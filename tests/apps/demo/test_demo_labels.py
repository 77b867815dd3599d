"""The demo labels a pseudo-labelled folder run's semseg classes with the names its dataset records."""
import json
import shutil

import torch

from conftest import need_demo_extra

from multimae.checkpoint import save_checkpoint
from multimae.core.config import to_dict
from multimae.model.multimae import ModelConfig, MultiMAE
from multimae.tasks.pretrain_config import PretrainConfig


def test_folder_run_semseg_class_names(tmp_path, folder_root):
    need_demo_extra()
    from multimae.apps.demo import engine_from_checkpoint

    names = ["sky", "tree", "road", "car", "person", "house"]
    root = tmp_path / "data"
    shutil.copytree(folder_root, root)
    meta = json.loads((root / "multimae_data.json").read_text()) if (root / "multimae_data.json").exists() else {}
    meta["pseudolabel"] = {"semseg": {"classes": names}}
    (root / "multimae_data.json").write_text(json.dumps(meta))
    cfg = PretrainConfig()
    cfg.model = ModelConfig(preset="nano", depth=1, decoder_depth=1, image_size=32, patch_size=8,
                            modalities={"semseg": {"num_classes": 6}})
    cfg.data.image_size = 32
    cfg.data.source, cfg.data.root = "folder", str(root)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run", 1, MultiMAE(cfg.model).state_dict(), {"step": 1}, {"config": to_dict(cfg)})
    engine = engine_from_checkpoint(tmp_path / "run", data=folder_root)
    assert engine.class_names is None or engine.class_names != names  # the data= folder has no names
    engine = engine_from_checkpoint(tmp_path / "run", data=root)
    assert engine.class_names == names
