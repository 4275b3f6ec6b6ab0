"""What a model costs, from its shapes alone (``jax.eval_shape``, no memory spent): parameter counts, the
parameters a token is multiplied with, and model FLOPs per token (for MFU)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.models.transformer import abstract_params


def param_shapes(config: ModelConfig) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves (main model and MTP modules)."""
    return nn.meta.unbox(abstract_params(config))


def param_counts(config) -> dict[str, int]:
    """Parameter counts from ``jax.eval_shape`` (no memory spent): main model and each MTP module's own."""
    shapes = param_shapes(config)
    counts = {"main": 0}
    for key, sub in shapes.items():
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sub))
        if key.startswith("mtp_"):
            counts[key] = n
        else:
            counts["main"] += n
    return counts


@functools.lru_cache(maxsize=64)
def active_params(config, mtp: bool = True) -> float:
    """Parameters a token is multiplied with: everything but the embedding table (a lookup), each routed expert
    weighted by K / E (a token uses K of the E), the MTP modules only when ``mtp``. Cached per (frozen) config:
    the training loop asks for every step's MFU, and tracing the model's init costs seconds."""
    shapes = param_shapes(config)
    total = 0.0
    for path, x in jax.tree_util.tree_leaves_with_path(shapes):
        keys = [str(getattr(p, "key", p)) for p in path]
        if keys[0] == "embed_tokens" or keys[-1] == "tid2eid" or (keys[0].startswith("mtp_") and not mtp):
            continue  # lookups (the embedding, V4's hash table), not multiplied
        n = float(np.prod(x.shape))
        if "experts" in keys and "shared_experts" not in keys:
            n *= config.num_experts_per_tok / config.n_routed_experts
        total += n
    return total


def attention_flops_per_key(config, *, train: bool, mtp: bool = True) -> float:
    """Attention FLOPs of one query attending one key: ``2 x heads x (qk_head_dim + v_head_dim)`` per layer;
    training (forward + backward) is three times the forward."""
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if mtp else 0)
    head_dims = (config.qk_head_dim + config.v_head_dim) if config.uses_mla else 2 * config.attn_head_dim
    forward = 2.0 * layers * config.num_attention_heads * head_dims
    return 3.0 * forward if train else forward


def indexer_flops_per_key(config, *, mtp: bool = True) -> float:
    """DeepSeek-V3.2's lightning indexer scoring one key for one query: ``2 x index_n_heads x index_head_dim`` per
    layer (0 without an indexer). Forward only: the top-k choice has no gradient (the sparse stage's KL over the
    selected keys is a small part, not counted)."""
    if not config.has_indexer:
        return 0.0
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if mtp else 0)
    return 2.0 * layers * config.index_n_heads * config.index_head_dim


def causal_selected(length: float, topk: int) -> float:
    """The mean over a causal document of ``length`` tokens of the keys a query attends under a top-``topk``
    selection: ``min(topk, t)`` for the t-th token."""
    if length <= topk:
        return (length + 1) / 2
    return (topk * (topk + 1) / 2 + (length - topk) * topk) / length


def flops_per_token(config, context: float, *, train: bool, mtp: bool = True, selected: float = None) -> float:
    """Model FLOPs per token: ``2 x active_params`` for the matmuls plus attention over ``context`` keys on
    average (``(T + 1) / 2`` for a causal document of T tokens, the cache length for a decode step); training
    (forward + backward) is three times the forward. V3.2 attends ``selected`` keys on average (default
    ``min(index_topk, context)``, exact for a decode step; ``causal_selected`` for a document) and its indexer
    scores all ``context``."""
    matmuls = 2.0 * active_params(config, mtp) * (3.0 if train else 1.0)
    return matmuls + _key_flops(config, context, selected, train=train, mtp=mtp)


def v4_attention_flops(config, context: float, *, train: bool) -> float:
    """DeepSeek-V4's attention FLOPs for one query with ``context`` visible tokens: per layer, the window's
    ``min(window, context)`` entries plus the pooled ones it reads (CSA: ``min(index_topk, context / rate)``; HCA:
    ``context / rate``), each ``2 x heads x 2 x head_dim`` (scores and values from the one K=V head), and CSA's
    indexer scoring ``context / rate`` entries at ``2 x index_n_heads x index_head_dim`` (forward only)."""
    from deepseek_jax.config.model import CSA, SWA

    c = config
    per_entry = 4.0 * c.num_attention_heads * c.head_dim * (3.0 if train else 1.0)
    total = 0.0
    for kind in c.layer_types:
        entries = min(c.sliding_window, context)
        if kind != SWA:
            pooled = context / c.compress_rate(kind)
            entries += min(c.index_topk, pooled) if kind == CSA else pooled
            if kind == CSA:
                total += 2.0 * c.index_n_heads * c.index_head_dim * pooled
        total += per_entry * entries
    return total


def _key_flops(config, keys: float, selected, *, train: bool, mtp: bool) -> float:
    """Attention over ``keys`` visible keys (V3.2: over the ``selected`` ones, plus the indexer over all)."""
    if config.is_v4:
        return v4_attention_flops(config, keys, train=train)
    per_key = attention_flops_per_key(config, train=train, mtp=mtp)
    if not config.has_indexer:
        return per_key * keys
    if selected is None:
        selected = min(config.index_topk, keys)
    return per_key * selected + indexer_flops_per_key(config, mtp=mtp) * keys


def batch_flops(config, tokens: float, attended_keys: float, *, train: bool, mtp: bool = True,
                selected_keys: float = None) -> float:
    """Model FLOPs over ``tokens`` tokens that attend ``attended_keys`` keys in all (a packed batch: each token
    its own document's earlier keys and itself): the matmuls per token plus attention per key. V3.2 attends
    ``selected_keys`` in all (each token ``min(index_topk, visible)``) and its indexer scores ``attended_keys``.
    V4 (whose cost is not linear in the keys): every token counted at the batch's mean context."""
    if config.is_v4:
        return flops_per_token(config, attended_keys / max(tokens, 1.0), train=train, mtp=mtp) * tokens
    return (flops_per_token(config, 0.0, train=train, mtp=mtp, selected=0.0) * tokens
            + _key_flops(config, attended_keys, selected_keys, train=train, mtp=mtp))
