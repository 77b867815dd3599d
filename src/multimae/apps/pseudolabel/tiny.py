"""Tiny random-init labellers written to disk, for tests, benchmarks and trying the command offline.

They have the real architectures (DPT, Mask2Former with a Swin backbone built from its config, never
downloaded; a MultiMAE checkpoint of this library) at toy sizes: their maps are noise, their code
paths and file formats are the real ones.
"""
from __future__ import annotations

import os
from pathlib import Path

from multimae.apps.pseudolabel.labels import coco_panoptic_names


def save_tiny_dpt(path: str | os.PathLike, image_size: int = 64) -> Path:
    """A ~0.2M-parameter DPT depth model + its image processor (resizes to ``image_size`` square)."""
    import transformers

    cfg = transformers.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                 image_size=image_size, patch_size=16, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, backbone_out_indices=[0, 1, 2, 3],
                                 reassemble_factors=[4, 2, 1, 0.5])
    transformers.DPTForDepthEstimation(cfg).save_pretrained(path)
    transformers.DPTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return Path(path)


def save_tiny_mask2former(path: str | os.PathLike, shortest_edge: int = 48, longest_edge: int = 96) -> Path:
    """A ~0.35M-parameter Mask2Former (Swin backbone from its config, no pretrained weights) whose
    labels are the 133 COCO panoptic categories, + its image processor."""
    import transformers

    names = coco_panoptic_names()
    backbone = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                       num_heads=[1, 1, 2, 2], window_size=4,
                                       out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.Mask2FormerConfig(
        backbone_config=backbone, use_pretrained_backbone=False, hidden_dim=32, mask_feature_size=32, feature_size=32,
        num_queries=8, encoder_layers=1, decoder_layers=2, encoder_feedforward_dim=32, dim_feedforward=32,
        num_attention_heads=2, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    transformers.Mask2FormerForUniversalSegmentation(cfg).save_pretrained(path)
    transformers.Mask2FormerImageProcessor(size={"shortest_edge": shortest_edge, "longest_edge": longest_edge}
                                           ).save_pretrained(path)
    return Path(path)


def save_random_multimae(run_dir: str | os.PathLike, preset: str = "base", image_size: int = 224,
                         num_classes: int = 133) -> Path:
    """A random-init MultiMAE (rgb in; depth and semseg out) saved as a checkpoint of this library."""
    import torch

    from multimae.checkpoint import save_checkpoint
    from multimae.core.config import to_dict
    from multimae.data.config import DataConfig
    from multimae.model.multimae import ModelConfig, MultiMAE

    cfg = ModelConfig(preset=preset, image_size=image_size, inputs=["rgb"], outputs=["depth", "semseg"],
                      modalities={"semseg": {"num_classes": num_classes}})
    torch.manual_seed(0)
    model = MultiMAE(cfg)
    config = {"model": to_dict(cfg), "data": to_dict(DataConfig(source="folder"))}
    return save_checkpoint(run_dir, 0, model.state_dict(), {"step": 0}, {"config": config, "epoch": 0})


def save_tiny_segformer(path: str | os.PathLike, classes: tuple[str, ...] = ("lava", "sky", "grass"),
                        image_size: int = 64) -> Path:
    """A ~7k-parameter SegFormer semantic-segmentation model with its own (non-COCO) label set."""
    import transformers

    cfg = transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
        id2label=dict(enumerate(classes)), label2id={n: i for i, n in enumerate(classes)})
    transformers.SegformerForSemanticSegmentation(cfg).save_pretrained(path)
    transformers.SegformerImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return Path(path)
