"""A preset's or checkpoint's architecture, parameter counts and KV cache size, as text (``deepseek-jax info``)."""

from __future__ import annotations

from deepseek_jax.layers import kv_cache
from deepseek_jax.models.counts import param_counts


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


def _describe_v4(config, counts) -> str:
    """DeepSeek-V4: attention kinds, hyper-connections, routers, and the cache (which depends on the length)."""
    from deepseek_jax.config.model import CSA, HCA, SWA
    from deepseek_jax.config.presets import DEEPSEEK_V32

    c = config
    kinds = ", ".join(f"{c.layer_types.count(k)} {name}" for k, name in ((CSA, "CSA"), (HCA, "HCA"), (SWA, "window"))
                      if k in c.layer_types)
    rates = ", ".join(f"{name} 1 per {c.compress_rate(k)}" for k, name in ((CSA, "CSA"), (HCA, "HCA"))
                      if k in c.layer_types)
    rope = "" if c.rope_scaling is None else f", {c.rope_scaling.type} x{c.rope_scaling.factor:g}"
    lines = [
        f"model_type            {c.model_type}",
        f"layers                {c.num_hidden_layers} ({kinds}); {c.hc_mult} residual streams (hyper-connections)",
        f"hidden / heads        {c.hidden_size} / {c.num_attention_heads} query heads on one K=V head of "
        f"{c.head_dim} (rope on {c.qk_rope_head_dim})",
        f"q_lora / output       {c.q_lora_rank} / {c.o_groups} groups x {c.o_lora_rank}",
        f"attention             window {c.sliding_window} + pooled entries ({rates}); CSA's indexer "
        f"{c.index_n_heads} x {c.index_head_dim} picks {c.index_topk}",
        f"rope                  theta {c.rope_theta:g} (window layers), {c.compress_rope_theta:g}{rope} (compressed)",
        f"experts               {c.n_routed_experts} routed + {c.n_shared_experts} shared, {c.num_experts_per_tok} "
        f"per token ({c.scoring_func}; {c.mlp_layer_types.count('hash_moe')} hash-routed layers)",
        f"MTP modules           {c.num_nextn_predict_layers} in the release (not built here: no speculative decoding)",
        f"params (main)         {counts['main']:,}",
    ]
    v32 = kv_cache.cache_bytes_per_token(DEEPSEEK_V32, "bfloat16")
    for length in (8192, 131072, 1048576):
        parts = kv_cache.v4_cache_bytes(c, length, "bfloat16")
        total = sum(parts.values())
        lines.append(
            f"cache at {length // 1024:>5}k      {total / 2**20:,.1f} MiB in bf16 ({total / length:,.1f} bytes / token"
            "; "
            f"window {parts['window'] / 2**20:,.1f}, pool {parts['pool'] / 2**20:,.1f}, indexer keys "
            f"{parts['index'] / 2**20:,.1f}, compressor state (fp32) {parts['state'] / 2**20:,.2f} MiB); "
            f"V3.2 {v32:,} bytes / token ({total / length / v32:.1%})")
    return "\n".join(lines)


def describe(config) -> str:
    counts = param_counts(config)
    if config.is_v4:
        return _describe_v4(config, counts)
    if not config.uses_mla:
        return _describe_dense(config, counts)
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    lines = [
        f"model_type            {config.model_type}",
        f"layers                {config.num_hidden_layers} ({config.num_hidden_layers - moe_layers} dense, "
        f"{moe_layers} MoE)",
        f"hidden / heads        {config.hidden_size} / {config.num_attention_heads}",
        f"q_lora / kv_lora      {config.q_lora_rank} / {config.kv_lora_rank}",
        f"experts               {config.n_routed_experts} routed + {config.n_shared_experts} shared, "
        f"{config.num_experts_per_tok} per token ({config.topk_method}, {config.scoring_func})",
        f"MTP modules           {config.num_nextn_predict_layers}",
        f"params (main)         {counts['main']:,}",
    ]
    lines += [f"params ({k}, own)     {v:,}" for k, v in counts.items() if k != "main"]
    if config.has_indexer:
        lines.append(f"sparse attention      indexer {config.index_n_heads} heads x {config.index_head_dim}, "
                     f"top-{config.index_topk} keys per query")
    values = config.kv_cache_dim + (config.index_head_dim if config.has_indexer else 0)
    what = f"{config.kv_cache_dim} + {config.index_head_dim} (indexer key)" if config.has_indexer else f"{values}"
    per_token = values * config.num_hidden_layers
    lines.append(f"MLA cache / token     {what} values x {config.num_hidden_layers} layers = "
                 f"{per_token:,} values ({kv_cache.cache_bytes_per_token(config, 'bfloat16'):,} bytes in bf16)")
    return "\n".join(lines)
