"""Small, pure building blocks: attention, transformer blocks, position embeddings."""
from multimae.layers.attention import Attention, Block, CrossAttention, set_attention, set_attention_mode
from multimae.layers.pos_embed import sincos_1d, sincos_2d

__all__ = ["Attention", "Block", "CrossAttention", "set_attention", "set_attention_mode", "sincos_1d", "sincos_2d"]
