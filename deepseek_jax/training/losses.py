"""Training losses: next-token CE, MTP, DeepSeek's balance losses, z-loss; and the aux-loss-free bias update.

Router statistics come from ``Transformer.apply(..., return_router_stats=True)``: per MoE layer and sequence,
``counts [L, B, E]`` (tokens that chose each expert) and ``scores [L, B, E]`` (summed per-token normalized
scores ``s / sum(s)``). Token counts per sequence are ``counts.sum(-1) / K``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.models.transformer import mtp_segment_ids


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed token CE in fp32 and the number of counted tokens (mask ``[B, T]`` of 0/1)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return ((lse - picked) * mask).sum(), mask.sum()


def z_loss(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed ``logsumexp(logits)**2`` (keeps the softmax normalizer near 1) and the token count."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    mask = mask.astype(jnp.float32)
    return (lse**2 * mask).sum(), mask.sum()


def mtp_targets(targets: jax.Array, mask: jax.Array, segment_ids: jax.Array, depth: int):
    """Targets and mask for MTP depth k: entry i of depth k predicts ``targets[i + k]``; only where i and i+k
    belong to the same document (packed rows) and that target counts."""
    same_doc = mtp_segment_ids(segment_ids, depth) > 0
    return targets[:, depth:], mask[:, depth:] * same_doc.astype(mask.dtype)


def mtp_loss(mtp_logits: list[jax.Array], targets, mask, segment_ids, weight: float, counts=None):
    """``L_MTP = lambda / D * sum_k CE_k`` (DeepSeek-V3 eq. 25), each CE_k a mean over its counted tokens.

    ``counts``: per depth, the number of counted tokens to divide by (default: this batch's own); the train
    step passes the global batch's, so that micro-batches add up to the big batch's loss.
    """
    if not mtp_logits:
        return jnp.zeros((), jnp.float32)
    total = jnp.zeros((), jnp.float32)
    for k, logits in enumerate(mtp_logits, start=1):
        tk, mk = mtp_targets(targets, mask, segment_ids, k)
        s, n = cross_entropy(logits, tk, mk)
        total = total + s / jnp.maximum(n if counts is None else counts[k - 1], 1.0)
    return weight / len(mtp_logits) * total


def balance_loss(stats: dict, config: ModelConfig, alpha: float, sequence_wise: bool,
                 num_sequences=None) -> jax.Array:
    """DeepSeek's balance loss ``alpha * sum_i f_i P_i`` per MoE layer, summed over layers.

    ``f_i = E / (K * T) * (tokens choosing i)``, ``P_i = (1/T) * sum_t s'_{i,t}``. Sequence-wise (V3, and V2
    with ``seq_aux``): computed per sequence, a document of a packed row being a sequence of its own (the MoE's
    ``doc_balance`` and ``documents`` statistics), and averaged over the documents (``num_sequences`` of them
    when given, a scalar or one per layer: the global batch's count under gradient accumulation); otherwise (V2
    expert-level) over the whole batch.
    """
    if not stats or alpha == 0:
        return jnp.zeros((), jnp.float32)
    if sequence_wise:
        if num_sequences is None:
            num_sequences = stats["documents"].sum(-1)
        per_layer = stats["doc_balance"].sum(-1) / jnp.maximum(num_sequences, 1.0)  # [L]
        return alpha * per_layer.sum()
    counts, scores = stats["counts"].sum(1), stats["scores"].sum(1)  # [L, E]: the whole batch
    e, k = config.n_routed_experts, config.num_experts_per_tok
    tokens = jnp.maximum(counts.sum(-1, keepdims=True) / k, 1.0)  # [L, 1]
    return alpha * (e / (k * tokens) * counts * (scores / tokens)).sum()


def loss_normalizers(batch: dict, mtp_depths: int) -> dict:
    """The counts each loss term divides by, taken from the whole (global) batch: counted tokens, per MTP
    depth its counted tokens, and the documents holding tokens (main stack and per MTP depth, for the
    sequence-wise balance loss). Each micro-batch's loss divides its sums by these, so the micro-batches add
    up to exactly the big batch's loss and gradient whatever their padding or packing."""
    mask, seg = batch["loss_mask"].astype(jnp.float32), batch["segment_ids"]
    def documents(s):  # distinct positive segment ids, row by row
        s = jnp.sort(s, axis=1)
        return ((s[:, :1] > 0).sum() + ((s[:, 1:] != s[:, :-1]) & (s[:, 1:] > 0)).sum()).astype(jnp.float32)

    depths = range(1, mtp_depths + 1)
    return {
        "tokens": mask.sum(),
        "input_tokens": (seg > 0).sum().astype(jnp.float32),  # real tokens (V3.2's indexer KL is per query)
        "mtp_tokens": jnp.stack([mtp_targets(batch["targets"], mask, seg, k)[1].sum() for k in depths])
        if mtp_depths else jnp.zeros((0,), jnp.float32),
        "sequences": documents(seg),
        "mtp_sequences": jnp.stack([documents(mtp_segment_ids(seg, k)) for k in depths])
        if mtp_depths else jnp.zeros((0,), jnp.float32),
    }


def update_correction_bias(bias: jax.Array, counts: jax.Array, gamma: float) -> jax.Array:
    """Aux-loss-free balancing (DeepSeek-V3 section 2.1.2), outside the gradient: per layer, ``b_i -= gamma``
    for experts loaded above the layer's mean load and ``+= gamma`` below it.

    bias ``[..., E]``; counts ``[..., E]`` over the whole global batch (sum over sequences and micro-batches).
    """
    load = counts.astype(jnp.float32)
    mean = load.mean(-1, keepdims=True)
    return bias - gamma * jnp.sign(load - mean)
