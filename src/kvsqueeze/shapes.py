"""Attention shapes read from a model config, whatever the family's spelling (no model, no cache needed)."""

from __future__ import annotations

from .errors import KVSqueezeError


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) of a text config, for every family's spelling.

    Multi-head attention configs (GPT-2, GPT-NeoX, OPT, ...) have no `num_key_value_heads`: they are grouped-query
    attention with as many kv heads as heads (multi-query configs, `multi_query=True`: one kv head). `head_dim`
    defaults to hidden_size // heads when absent or None. Raises `KVSqueezeError` when the config names no heads.
    """
    n_heads = getattr(config, "num_attention_heads", None)
    if not n_heads:
        raise KVSqueezeError(f"{getattr(config, 'model_type', type(config).__name__)} has no attention heads "
                             "kvsqueeze can compress (its config has no num_attention_heads)")
    n_kv = getattr(config, "num_key_value_heads", None)
    if not n_kv:
        n_kv = 1 if getattr(config, "multi_query", False) else n_heads
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        hidden = getattr(config, "hidden_size", None)
        if not hidden:
            raise KVSqueezeError(f"{getattr(config, 'model_type', type(config).__name__)}: cannot tell the head "
                                 "size (its config has neither head_dim nor hidden_size)")
        head_dim = hidden // n_heads
    return int(n_heads), int(n_kv), int(head_dim)
