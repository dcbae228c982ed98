"""Models: a compact Transformer (teacher and student of the distillation engine), its generation with a KV cache,
and student initialization."""

from tsa_fast.models.generation import KVCache, next_token
from tsa_fast.models.init import default_layer_map, every_kth_layer, init_from_teacher
from tsa_fast.models.transformer import (
    Transformer,
    TransformerConfig,
    TransformerOutput,
    checkpoint_state_dict,
    gathered,
    mean_pool,
    num_parameters,
)

__all__ = [
    "KVCache",
    "Transformer",
    "TransformerConfig",
    "TransformerOutput",
    "checkpoint_state_dict",
    "default_layer_map",
    "every_kth_layer",
    "gathered",
    "init_from_teacher",
    "mean_pool",
    "next_token",
    "num_parameters",
]
