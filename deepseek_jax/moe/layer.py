"""The DeepSeekMoE layer (docs/reference.md, section 2): router, routed experts (dropless by default), shared
experts, and the router statistics the balancing needs.

N tokens (batch and length flattened), D model width, E routed experts, K experts per token, I expert width.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.linear import matmul_recipe
from deepseek_jax.layers.lora import lora_kernel, module_path
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.moe.dispatch import dispatch_local
from deepseek_jax.moe.expert_parallel import expert_parallel_dispatch
from deepseek_jax.moe.router import Router
from deepseek_jax.parallel.mesh import current_mesh
from deepseek_jax.parallel.rules import rule_axes, token_axes, token_split
from deepseek_jax.quant.weights import Fp8Weight


class Experts(nn.Module):
    """The routed experts' weights, stacked: gate/up ``[E, D, I]``, down ``[E, I, D]``; and their dispatch.

    On one device every expert runs here. Under a mesh (a step traced with ``jax.set_mesh``) the dispatch runs
    per device under ``jax.shard_map`` (``expert_parallel.py``): each device routes its own tokens, and with an
    ``expert`` axis the rows travel to the experts' owners by all-to-all. The mesh axes come from the logical
    rules in effect (``act_batch`` for the tokens, ``expert`` for the expert stacks, ``moe_mlp`` for their width).
    Returns the combined output ``[N, D]`` (fp32) and the rows dropped by ``capacity_factor`` per expert ``[E]``
    (0 when dropless).
    ``rematerialized``: the layer runs under ``jax.checkpoint`` (``ModelOptions.moe_keep_received`` applies only
    to layers that do not).
    """

    config: ModelConfig
    options: ModelOptions
    rematerialized: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, weights: jax.Array, idx: jax.Array, batch: int):
        """x ``[N, D]`` with ``N = batch x length`` tokens (sequence-major); weights / idx ``[N, K]``."""
        c, o = self.config, self.options
        e, d, i = c.n_routed_experts, x.shape[-1], c.moe_intermediate_size

        def param(name, shape, axes):
            init = nn.initializers.normal(c.initializer_range)
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, o.params_dtype)

        wg = param("gate_proj", (e, d, i), ("expert", "embed", "moe_mlp"))
        wu = param("up_proj", (e, d, i), ("expert", "embed", "moe_mlp"))
        wd = param("down_proj", (e, i, d), ("expert", "moe_mlp", "embed"))
        # The compute-dtype copy is what enters the dispatch: under FSDP the per-layer gather of the local experts
        # (and the reduce-scatter of their gradient) moves bf16, not the fp32 master weights. The recipes cast
        # to the compute dtype anyway, so the numbers do not change. FP8-kept stacks enter as they are (e4m3 +
        # block scales, gathered as such): the grouped GEMM dequantizes only the experts it reads ("gather":
        # the chosen ones; "blocked": one per block) or, for "ragged" / "dense", the device's local stack.
        wg, wu, wd = (w if isinstance(w, Fp8Weight) else w.astype(o.compute_dtype) for w in (wg, wu, wd))
        if o.lora is not None:  # per-expert adapters, multiplied inside the grouped GEMMs (layers/lora.py)
            path = module_path(self)
            wg, wu, wd = (
                lora_kernel(self, w, f"{name}_", o.lora, axes, 1, lead=1) if o.lora.applies(f"{path}/{name}") else w
                for w, name, axes in ((wg, "gate_proj", ("expert", "embed", "moe_mlp")),
                                      (wu, "up_proj", ("expert", "embed", "moe_mlp")),
                                      (wd, "down_proj", ("expert", "moe_mlp", "embed"))))
        recipe = matmul_recipe(o)
        mesh = current_mesh()
        if mesh is None:
            impl = o.grouped_impl(idx.size, e)
            y = dispatch_local(recipe, x, weights, idx, wg, wu, wd, impl, o.moe_block_size, c.swiglu_limit)
            return y, jnp.zeros((e,), jnp.int32)
        sizes = mesh.shape
        expert_axes = rule_axes("expert")
        tensor_axes = rule_axes("moe_mlp")
        ep = sizes.get(expert_axes[0], 1) if expert_axes else 1
        # The tokens are split as the activations are: sequences over the batch axes that divide them, and
        # (context parallelism) each sequence over the context axis.
        split = token_axes(mesh, batch, x.shape[0] // batch)
        # Rows a device's grouped GEMM sees: its own tokens' rows, times EP when they arrive from its peers.
        n_split = math.prod(sizes[a] for a in split)
        rows = idx.size // n_split * (ep if expert_axes and expert_axes[0] in split else 1)
        impl = o.grouped_impl(rows, e // ep)
        return expert_parallel_dispatch(
            recipe, x, weights, idx, wg, wu, wd, mesh=mesh, token_axes=split,
            expert_axis=expert_axes[0] if expert_axes else None, tensor_axis=tensor_axes[0] if tensor_axes else None,
            impl=impl, block_size=o.moe_block_size, capacity_factor=o.capacity_factor,
            exchange_rows=o.moe_exchange_rows, ragged=o.target_platform() in ("tpu", "gpu"),
            keep_received=o.moe_keep_received and not self.rematerialized, limit=c.swiglu_limit)


class MoE(nn.Module):
    """Routed experts plus shared experts. Returns the output and this layer's router statistics.

    Statistics (per row, padding excluded; what the balance losses and the bias update need):
      ``counts [B, E]``: how many of the row's tokens chose each expert (sum over E = K * tokens);
      ``scores [B, E]``: sum over the row's tokens of the scores normalized per token, ``s / sum(s)``;
      with ``config.seq_aux`` (DeepSeek's sequence-wise balance loss), per document of a packed row:
      ``doc_balance [B]``: the sum over the row's documents of ``sum_e f_e P_e`` (``training/losses.py``'s
      ``balance_loss``), ``documents [B]``: how many documents the row holds. ``segments`` (``[B, T]``) name
      them: ids 1..T, 0 for padding;
      ``dropped [E]``: token-expert rows dropped per expert by ``ModelOptions.capacity_factor`` over the batch (0
      when dropless); ``counts`` are the routing decisions, drops included.
    """

    config: ModelConfig
    options: ModelOptions
    rematerialized: bool = False  # see Experts
    hash_routed: bool = False  # see Router

    @nn.compact
    def __call__(self, x: jax.Array, segments: jax.Array,
                 token_ids: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, Any]]:
        c, o = self.config, self.options
        b, t, d = x.shape
        weights, idx, scores = Router(c, o, self.hash_routed, name="gate")(x, token_ids)  # [B,T,K], [B,T,K], [B,T,E]
        k = idx.shape[-1]
        routed, dropped = Experts(c, o, self.rematerialized, name="experts")(
            x.reshape(b * t, d), weights.reshape(b * t, k), idx.reshape(b * t, k), b)
        out = routed.astype(o.compute_dtype).reshape(b, t, d)
        if c.n_shared_experts > 0:
            shared = MLP(c.n_shared_experts * c.moe_intermediate_size, o, c.initializer_range, c.swiglu_limit,
                         name="shared_experts")
            out = out + shared(x)
        return out, {"dropped": dropped, **router_stats(idx, scores, segments, c)}


def router_stats(idx: jax.Array, scores: jax.Array, segments: jax.Array, config: ModelConfig) -> dict[str, Any]:
    """``MoE``'s statistics (its docstring) from the choices ``[B, T, K]``, scores ``[B, T, E]`` and segment ids
    ``[B, T]``. Under a mesh they are computed per device on its own tokens (``shard_map``): only the per-row sums
    cross devices, by a ``psum`` over the context axis when it splits the sequence. (Left to GSPMD, the per-document
    scatter made XLA all-gather every token's choices and segment ids.)"""
    mesh = current_mesh()
    if mesh is None or getattr(mesh, "manual_axes", ()):
        return _row_stats(idx, scores, segments, config, segments.shape[1], ())
    batch, ctx = token_split(mesh, *segments.shape)
    bt, ct = batch or None, ctx or None
    out_specs = {"counts": P(bt, None), "scores": P(bt, None)}
    if config.seq_aux:
        out_specs.update(doc_balance=P(bt), documents=P(bt))
    local = partial(_row_stats, config=config, length=segments.shape[1], ctx=ctx)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(bt, ct, None), P(bt, ct, None), P(bt, ct)),
                         out_specs=out_specs)(idx, scores, segments)


def _row_stats(idx, scores, segments, config: ModelConfig, length: int, ctx: tuple) -> dict[str, Any]:
    """The statistics of the rows ``idx`` / ``scores`` / ``segments`` hold (``length`` tokens each, split over
    the ``ctx`` axes when there are any: their partial sums are added over them)."""
    def total(a):
        return jax.lax.psum(a, ctx) if ctx else a

    mask = (segments > 0)[..., None].astype(jnp.float32)
    chosen = jax.nn.one_hot(idx, config.n_routed_experts, dtype=jnp.float32).sum(-2) * mask
    normed = scores / scores.sum(-1, keepdims=True) * mask
    stats = {"counts": total(chosen.sum(1)), "scores": total(normed.sum(1))}
    if config.seq_aux:
        stats["doc_balance"], stats["documents"] = document_balance(
            chosen, normed, segments, config.num_experts_per_tok, length, total)
    return stats


def document_balance(chosen: jax.Array, normed: jax.Array, segments: jax.Array, k: int,
                     length: Optional[int] = None, total: Optional[Callable] = None):
    """Per row ``[B]``: the sum over its documents of ``sum_e f_e P_e`` (``f_e = E / (K T_d) * c_e``, ``P_e =
    S_e / T_d`` over document d's ``T_d`` tokens), and the number of documents. ``chosen`` / ``normed``
    ``[B, T, E]`` (padding zeroed); ``segments [B, T]`` ids 1..length (0: padding; a larger id counts as
    ``length``, by default T). Summed per document by id, so rows in context parallelism's zig-zag order work
    alike; ``total`` adds the per-document sums over the devices that hold parts of a row."""
    b, t, e = chosen.shape
    length = t if length is None else length
    rows = jnp.arange(b)[:, None]
    doc = jnp.clip(segments, 0, length)

    def per_doc(a):  # [B, T, E] -> [B, length, E]: row r's document d in slot d - 1
        sums = jnp.zeros((b, length + 1, e), jnp.float32).at[rows, doc].add(a)[:, 1:]
        return sums if total is None else total(sums)

    counts, sums = per_doc(chosen), per_doc(normed)
    tokens = counts.sum(-1, keepdims=True) / k
    safe = jnp.maximum(tokens, 1.0)
    balance = (e / (k * safe) * counts * (sums / safe)).sum((1, 2))
    return balance, (tokens[..., 0] > 0).sum(-1).astype(jnp.float32)
