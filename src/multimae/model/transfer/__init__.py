"""Transfer: a pretrained (or fresh) MultiMAE encoder over any subset of modalities + a task head."""
from multimae.model.transfer.load import LoadReport, build_transfer_model, filter_multimae_state_dict
from multimae.model.transfer.model import (
    EncoderOutput,
    HeadConfig,
    TransferEncoder,
    TransferModel,
    TransferModelConfig,
    build_head,
)

__all__ = [
    "EncoderOutput",
    "HeadConfig",
    "LoadReport",
    "TransferEncoder",
    "TransferModel",
    "TransferModelConfig",
    "build_head",
    "build_transfer_model",
    "filter_multimae_state_dict",
]
