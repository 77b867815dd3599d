"""Transfer heads: classification, ConvNeXt semantic segmentation, DPT dense regression."""
from multimae.model.heads.classification import ClassificationHead
from multimae.model.heads.dpt import DPTHead, default_hooks, default_layer_dims
from multimae.model.heads.segmentation import SegmentationHead

__all__ = ["ClassificationHead", "SegmentationHead", "DPTHead", "default_hooks", "default_layer_dims"]
