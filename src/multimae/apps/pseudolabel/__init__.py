"""Pseudo-labelling: turn a folder (or shards) of rgb images into a multi-modal MultiMAE dataset.

    from multimae.apps.pseudolabel import build_labelers, pseudolabel
    labelers = build_labelers(depth="models/dpt", semseg="models/mask2former-coco")
    report = pseudolabel("photos/", "data/mydata", labelers, split="train", batch_size=8)

Any object with the :class:`Labeler` protocol (``tasks``, ``info()``, ``__call__(images)``) can be
passed in ``labelers``. ``transformers`` is needed only for the Hugging Face labellers
(``pip install 'multimae[pseudolabel]'``).
"""
from multimae.apps.pseudolabel.labelers import (
    HFDepthLabeler, HFSegmentationLabeler, Labeler, LabelerError, MultiMAELabeler, load_labeler, resize_map,
)
from multimae.apps.pseudolabel.labels import (
    COCO_PANOPTIC, LabelMap, build_label_map, coco_panoptic_categories, coco_panoptic_names, panoptic_to_semantic,
)
from multimae.apps.pseudolabel.run import PseudolabelReport, build_labelers, encode_depth, pseudolabel

__all__ = [
    "COCO_PANOPTIC", "HFDepthLabeler", "HFSegmentationLabeler", "LabelMap", "Labeler", "LabelerError",
    "MultiMAELabeler", "PseudolabelReport", "build_label_map", "build_labelers", "coco_panoptic_categories",
    "coco_panoptic_names", "encode_depth", "load_labeler", "panoptic_to_semantic", "pseudolabel", "resize_map",
]
