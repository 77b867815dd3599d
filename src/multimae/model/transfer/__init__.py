"""Transfer: a pretrained (or fresh) MultiMAE encoder over any subset of modalities + a task head."""
from multimae.model.encoder import EncoderOutput
from multimae.model.transfer.load import build_transfer_model, read_init
from multimae.model.transfer.model import (
    HeadConfig,
    TransferEncoder,
    TransferModel,
    TransferModelConfig,
    build_head,
)

__all__ = [
    "EncoderOutput",
    "HeadConfig",
    "TransferEncoder",
    "TransferModel",
    "TransferModelConfig",
    "build_head",
    "build_transfer_model",
    "read_init",
]
