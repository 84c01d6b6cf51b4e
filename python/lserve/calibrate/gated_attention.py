"""DuoAttention gates on a Hugging Face model: attn = alpha * full + (1 - alpha) * streaming, per KV head.

`install_gates(model, sink_tokens, local_tokens)` registers one attention function with transformers'
AttentionInterface, points the model at it and hangs a shared `GateState` on every attention module
(the function finds it through the module it is handed, so no global state is involved). The base
weights are untouched; only `GateState.gates` (num_layers, num_kv_heads) is meant to train.
With `state.mode = "full"` the function is plain causal attention: the teacher of the distillation.
Reference: DuoAttention (arXiv 2410.10819), section 3.2; the streaming mask is StreamingLLM's sink +
local window (a query at position i sees keys j <= i with j < sink or i - j < local).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

ATTENTION_NAME = "lserve_duo_gated"


@dataclass
class GateState:
    """The trainable gates and the streaming window, shared by all attention modules of a model."""

    gates: torch.nn.Parameter  # (num_layers, num_kv_heads), in [0, 1]; 1 = full attention
    sink_tokens: int
    local_tokens: int
    mode: str = "gated"  # "gated" mixes full and streaming; "full" is the original model

    def clamp_(self) -> None:
        with torch.no_grad():
            self.gates.clamp_(0.0, 1.0)


def streaming_mask(num_queries: int, num_keys: int, sink_tokens: int, local_tokens: int,
                   device=None) -> torch.Tensor:
    """(num_queries, num_keys) bool, True where a query may attend: causal, and in the sink or the
    local window. Queries are the last `num_queries` positions of the `num_keys` keys."""
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    key_pos = torch.arange(num_keys, device=device)[None, :]
    causal = key_pos <= query_pos
    return causal & ((key_pos < sink_tokens) | (query_pos - key_pos < local_tokens))


def causal_mask(num_queries: int, num_keys: int, device=None) -> torch.Tensor:
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    return torch.arange(num_keys, device=device)[None, :] <= query_pos


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # (batch, num_kv_heads, num_keys, head_dim) -> (batch, num_kv_heads * groups, num_keys, head_dim)
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _combine(structural: torch.Tensor, attention_mask: Optional[torch.Tensor], num_keys: int) -> torch.Tensor:
    """The structural bool mask, intersected with (or added to) a 4-D mask the model passed, if any."""
    if attention_mask is None:
        return structural
    mask = attention_mask[..., :num_keys]
    if mask.dtype == torch.bool:
        return structural & mask
    return mask.masked_fill(~structural, float("-inf"))


def gated_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                            dropout: float = 0.0, **kwargs):
    """transformers attention-interface signature.

    query: (batch, num_qo_heads, num_queries, head_dim); key, value: (batch, num_kv_heads, num_keys,
    head_dim). Returns ((batch, num_queries, num_qo_heads, head_dim), None).
    """
    state: Optional[GateState] = getattr(module, "_lserve_gate_state", None)
    num_qo_heads, num_queries = query.shape[1], query.shape[2]
    num_kv_heads, num_keys = key.shape[1], key.shape[2]
    groups = num_qo_heads // num_kv_heads
    key = _expand_kv(key, groups)
    value = _expand_kv(value, groups)
    full_mask = _combine(causal_mask(num_queries, num_keys, query.device), attention_mask, num_keys)
    full = F.scaled_dot_product_attention(query, key, value, attn_mask=full_mask, scale=scaling)
    if state is None or state.mode == "full":
        return full.transpose(1, 2).contiguous(), None
    local_mask = _combine(streaming_mask(num_queries, num_keys, state.sink_tokens, state.local_tokens,
                                         query.device), attention_mask, num_keys)
    streaming = F.scaled_dot_product_attention(query, key, value, attn_mask=local_mask, scale=scaling)
    alpha = state.gates[module.layer_idx].to(query.dtype)  # (num_kv_heads,)
    alpha = alpha.repeat_interleave(groups)[None, :, None, None]  # (1, num_qo_heads, 1, 1)
    mixed = alpha * full + (1.0 - alpha) * streaming
    return mixed.transpose(1, 2).contiguous(), None


def attention_modules(model: torch.nn.Module):
    """The self-attention modules of a decoder, in layer order (each has `layer_idx`)."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if not found:
        raise ValueError(f"{type(model).__name__}: no attention modules with layer_idx and o_proj found "
                         "(lserve calibrates Llama-style Hugging Face models)")
    return sorted(found, key=lambda m: m.layer_idx)


def install_gates(model: torch.nn.Module, sink_tokens: int, local_tokens: int, initial_value: float = 1.0) -> GateState:
    """Freezes `model`, adds one gate per (layer, KV head) and routes attention through the gates."""
    from transformers import AttentionInterface

    config = model.config
    num_layers = config.num_hidden_layers
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    modules = attention_modules(model)
    if len(modules) != num_layers:
        raise ValueError(f"found {len(modules)} attention modules, the config says {num_layers} layers")
    for param in model.parameters():
        param.requires_grad_(False)
    gates = torch.nn.Parameter(torch.full((num_layers, num_kv_heads), float(initial_value), dtype=torch.float32))
    state = GateState(gates=gates, sink_tokens=sink_tokens, local_tokens=local_tokens)
    AttentionInterface.register(ATTENTION_NAME, gated_attention_forward)
    for module in modules:
        module._lserve_gate_state = state
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        config._attn_implementation = ATTENTION_NAME
    return state
