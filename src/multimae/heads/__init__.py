"""Transfer heads: classification, ConvNeXt semantic segmentation, DPT dense regression."""
from multimae.heads.classification import ClassificationHead
from multimae.heads.dpt import DPTHead, default_hooks, default_layer_dims
from multimae.heads.segmentation import SegmentationHead

__all__ = ["ClassificationHead", "SegmentationHead", "DPTHead", "default_hooks", "default_layer_dims"]
