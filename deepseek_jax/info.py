"""``deepseek-jax info``: a preset's or checkpoint's architecture, parameter counts and MLA cache size."""

from __future__ import annotations

import os

import numpy as np


def param_counts(config) -> dict[str, int]:
    """Parameter counts from ``jax.eval_shape`` (no memory spent): main model and each MTP module's own."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from .model import Transformer

    shapes = jax.eval_shape(
        lambda: nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    )["params"]
    counts = {"main": 0}
    for key, sub in shapes.items():
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sub))
        if key.startswith("mtp_"):
            counts[key] = n
        else:
            counts["main"] += n
    return counts


def active_params(config, mtp: bool = True) -> float:
    """Parameters a token is multiplied with: everything but the embedding table (a lookup), each routed expert
    weighted by K / E (a token uses K of the E), the MTP modules only when ``mtp``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from .model import Transformer

    shapes = jax.eval_shape(
        lambda: nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    )["params"]
    total = 0.0
    for path, x in jax.tree_util.tree_leaves_with_path(shapes):
        keys = [str(getattr(p, "key", p)) for p in path]
        if keys[0] == "embed_tokens" or (keys[0].startswith("mtp_") and not mtp):
            continue
        n = float(np.prod(x.shape))
        if "experts" in keys and "shared_experts" not in keys:
            n *= config.num_experts_per_tok / config.n_routed_experts
        total += n
    return total


def flops_per_token(config, context: float, *, train: bool, mtp: bool = True) -> float:
    """Model FLOPs per token: ``2 x active_params`` for the matmuls plus attention, ``2 x heads x (qk_head_dim +
    v_head_dim)`` per layer per key attended to (``context`` keys on average: ``T / 2`` for a causal sequence of
    T, the cache length for a decode step); training (forward + backward) is three times the forward."""
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if mtp else 0)
    head_dims = (config.qk_head_dim + config.v_head_dim) if config.uses_mla else 2 * config.attn_head_dim
    attention = 2.0 * layers * config.num_attention_heads * head_dims * context
    forward = 2.0 * active_params(config, mtp) + attention
    return 3.0 * forward if train else forward


def _describe_dense(config, counts) -> str:
    """A dense R1-Distill student: GQA shape, parameters, KV cache."""
    c = config
    rope = "plain" if c.rope_scaling is None else f"{c.rope_scaling.type} x{c.rope_scaling.factor:g}"
    per_token = c.kv_cache_dim * c.num_hidden_layers
    return "\n".join([
        f"model_type            {c.model_type} (dense R1-Distill student)",
        f"layers                {c.num_hidden_layers} dense",
        f"hidden / heads        {c.hidden_size} / {c.num_attention_heads} query, {c.num_key_value_heads} key/value "
        f"(head dim {c.attn_head_dim})",
        f"mlp                   {c.intermediate_size}",
        f"q/k/v bias            {c.qkv_bias}",
        f"tied embeddings       {c.tie_word_embeddings}",
        f"rope                  theta {c.rope_theta:g}, {rope}",
        f"params (main)         {counts['main']:,}",
        f"KV cache / token      {c.kv_cache_dim} values x {c.num_hidden_layers} layers = {per_token:,} values "
        f"({per_token * 2:,} bytes in bf16)",
    ])


def describe(config) -> str:
    counts = param_counts(config)
    if not config.uses_mla:
        return _describe_dense(config, counts)
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    lines = [
        f"model_type            {config.model_type}",
        f"layers                {config.num_hidden_layers} ({config.num_hidden_layers - moe_layers} dense, {moe_layers} MoE)",
        f"hidden / heads        {config.hidden_size} / {config.num_attention_heads}",
        f"q_lora / kv_lora      {config.q_lora_rank} / {config.kv_lora_rank}",
        f"experts               {config.n_routed_experts} routed + {config.n_shared_experts} shared, "
        f"{config.num_experts_per_tok} per token ({config.topk_method}, {config.scoring_func})",
        f"MTP modules           {config.num_nextn_predict_layers}",
        f"params (main)         {counts['main']:,}",
    ]
    lines += [f"params ({k}, own)     {v:,}" for k, v in counts.items() if k != "main"]
    per_token = config.kv_cache_dim * config.num_hidden_layers
    lines.append(f"MLA cache / token     {config.kv_cache_dim} values x {config.num_hidden_layers} layers = "
                 f"{per_token:,} values ({per_token * 2:,} bytes in bf16)")
    return "\n".join(lines)


def _run(args) -> int:
    from .config import ModelConfig, presets

    if os.path.exists(args.model):
        config = ModelConfig.from_pretrained(args.model)
    else:
        config = presets[args.model]
    print(describe(config))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameter counts and cache size of a preset or checkpoint")
    p.add_argument("model", help="a preset name (e.g. deepseek-v3) or a directory with config.json")
    p.set_defaults(func=_run)
