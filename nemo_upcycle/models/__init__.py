"""Models: the config, the reference PyTorch GPT (dense/MoE), and key maps to Megatron-core's specs."""

from nemo_upcycle.models.config import GPTConfig
from nemo_upcycle.models.reference import GPTModel, GPTOutput, lm_loss

__all__ = ["GPTConfig", "GPTModel", "GPTOutput", "lm_loss"]
