"""Input adapters (modality -> tokens) and output adapters (tokens -> predictions)."""
from multimae.model.adapters.input import CategoricalInput, PatchInput, build_input_adapter
from multimae.model.decoders import Segment, SpatialDecoder

__all__ = ["CategoricalInput", "PatchInput", "Segment", "SpatialDecoder", "build_input_adapter"]
