"""Input adapters (modality -> tokens) and output adapters (tokens -> predictions)."""
from multimae.adapters.input import CategoricalInput, PatchInput, build_input_adapter
from multimae.adapters.output import Segment, SpatialDecoder

__all__ = ["CategoricalInput", "PatchInput", "Segment", "SpatialDecoder", "build_input_adapter"]
