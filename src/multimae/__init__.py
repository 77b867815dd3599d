"""multimae: multi-modal, multi-task masked autoencoders (MultiMAE, M3AE) in PyTorch."""
from multimae.core.masking import MaskPlan, dirichlet_plan, ratio_plan
from multimae.core.modalities import ModalitySpec, register
from multimae.model.multimae import ModelConfig, MultiMAE, Outputs

__version__ = "0.1.0"
__all__ = ["MaskPlan", "ModalitySpec", "ModelConfig", "MultiMAE", "Outputs", "dirichlet_plan",
           "ratio_plan", "register", "__version__"]
