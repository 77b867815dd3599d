"""Small, pure building blocks: attention, transformer blocks, position embeddings, layer ids."""
from multimae.layers.attention import Attention, Block, CrossAttention, set_attention
from multimae.layers.layer_decay import EMBED_PATTERNS, vit_layer_id
from multimae.layers.pos_embed import sincos_1d, sincos_2d

__all__ = ["EMBED_PATTERNS", "Attention", "Block", "CrossAttention", "set_attention", "sincos_1d", "sincos_2d",
           "vit_layer_id"]
