"""Small, pure building blocks: attention, transformer blocks, position embeddings, layer ids."""
from multimae.model.layers.attention import Attention, Block, CrossAttention, set_attention
from multimae.model.layers.layer_decay import EMBED_PATTERNS, vit_layer_id
from multimae.model.layers.pos_embed import sincos_1d, sincos_2d

__all__ = ["EMBED_PATTERNS", "Attention", "Block", "CrossAttention", "set_attention", "sincos_1d", "sincos_2d",
           "vit_layer_id"]
