"""DeepSeek-V4's attention layers against V3's MLA at long context, on one CPU device, side by side in one run.

    python bench/v4_attention.py                     # T = 8192 and 32768
    python bench/v4_attention.py --lengths 8192 --repeats 3

Tiny dims, one row of T tokens, the attention layer alone (fp32; jitted; best of ``--repeats``), forward and
forward + backward (the gradient of a scalar of the output with respect to the input and the weights):
- ``V3 MLA``: tiny-v3's attention (4 heads, latent 32 + 8), blockwise over all visible keys (O(T^2));
- ``V4 CSA``: 4 heads sharing one K=V head of 32 (rope on 8), a window of 128, one pooled entry per 4 tokens of
  which the indexer (4 heads x 32) picks 64;
- ``V4 HCA``: the same with one pooled entry per 128 tokens, every visible one read;
- ``V4 window``: the window only (no pool).
Reported: seconds, and each V4 kind over V3's MLA. V4's attention reads O(T (window + picked)) entries for CSA and
O(T (window + T / 128)) for HCA; CSA's indexer still scores every pooled entry, O(T^2 / 4).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from sparse_attention import timed  # bench/ is the script's directory

import deepseek_jax as dsj
from deepseek_jax.config.model import CSA, HCA, SWA, ModelConfig
from deepseek_jax.layers.attention.layout import attention_layout
from deepseek_jax.layers.csa import CompressedAttention, v4_ropes
from deepseek_jax.layers.mla import MLA
from deepseek_jax.layers.rope import rope_cos_sin


def v4_config(t: int) -> ModelConfig:
    return ModelConfig.from_hf_dict(
        {"model_type": "deepseek_v4", "vocab_size": 512, "hidden_size": 64, "moe_intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 32, "q_lora_rank": 48,
         "partial_rotary_factor": 0.25, "n_routed_experts": 8, "num_experts_per_tok": 2, "o_groups": 2,
         "o_lora_rank": 16, "sliding_window": 128, "compress_rates": {CSA: 4, HCA: 128}, "index_n_heads": 4,
         "index_head_dim": 32, "index_topk": 64, "hc_mult": 2, "max_position_embeddings": max(t, 4096),
         "layer_types": [CSA], "mlp_layer_types": ["moe"]})


def layer(name: str, t: int):
    """``(apply(params, x), params)`` for one attention layer of kind ``name`` over T tokens."""
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    layout = attention_layout(jnp.ones((1, t), jnp.int32))
    x0 = jnp.zeros((1, 8, 64), jnp.float32)
    if name == "V3 MLA":
        config = dsj.presets["tiny-v3"].replace(max_position_embeddings=max(t, 4096), rope_scaling=None)
        module = MLA(config, dsj.ModelOptions())
        cos, sin = rope_cos_sin(positions, config)
        init_cs = rope_cos_sin(positions[:, :8], config)
        params = module.init(jax.random.PRNGKey(0), x0, *init_cs, attention_layout(jnp.ones((1, 8), jnp.int32)))
        return (lambda p, x: module.apply(p, x, cos, sin, layout)), nn.meta.unbox(params)
    kind = {"V4 CSA": CSA, "V4 HCA": HCA, "V4 window": SWA}[name]
    config = v4_config(t)
    module = CompressedAttention(config, dsj.ModelOptions(), kind)
    ropes, seg = v4_ropes(positions, config), jnp.ones((1, t), jnp.int32)
    small = attention_layout(jnp.ones((1, 8), jnp.int32))
    params = module.init(jax.random.PRNGKey(0), x0, v4_ropes(positions[:, :8], config), small, seg[:, :8],
                         positions[:, :8])
    return (lambda p, x: module.apply(p, x, ropes, layout, seg, positions)), nn.meta.unbox(params)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; best of {args.repeats}", flush=True)
    for t in args.lengths:
        x = jnp.asarray(np.random.RandomState(0).normal(size=(1, t, 64)), jnp.float32)
        fwd, step = {}, {}
        for name in ("V3 MLA", "V4 CSA", "V4 HCA", "V4 window"):
            apply, params = layer(name, t)
            grad = jax.jit(jax.grad(lambda p, x, apply=apply: jnp.sum(jnp.sin(apply(p, x))), argnums=(0, 1)))
            fwd[name] = timed(jax.jit(apply), params, x, repeats=args.repeats)
            step[name] = timed(grad, params, x, repeats=args.repeats)
            print(f"T {t:>7,}  {name:<10} forward {fwd[name]:8.3f} s   forward + backward {step[name]:8.3f} s",
                  flush=True)
        ratios = ", ".join(f"{n} {fwd[n] / fwd['V3 MLA']:.3f} / {step[n] / step['V3 MLA']:.3f}"
                           for n in fwd if n != "V3 MLA")
        print(f"T {t:>7,}  over V3 MLA (forward / forward + backward): {ratios}", flush=True)


if __name__ == "__main__":
    main()
