"""Quickstart: build the tiny DeepSeek-V3 preset, run it, and look inside.

Run top to bottom (`python examples/01_quickstart.py`); each step prints what it shows. Takes ~30 s on a CPU.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import deepseek_jax as dsj

# 1. A config: the tiny V3 preset has every part of the real model (MLA with q-LoRA, YaRN RoPE, a dense
#    layer then MoE layers with sigmoid routing over 4 expert groups, a shared expert, one MTP module).
config = dsj.presets["tiny-v3"]
print(f"tiny-v3: {config.num_hidden_layers} layers {config.layer_runs}, {config.n_routed_experts} experts, "
      f"{config.num_experts_per_tok} per token, MTP modules: {config.num_nextn_predict_layers}")

# 2. The model is a Flax Linen module; init gives a plain params pytree (stacked layers: one nn.scan per run).
model = dsj.Transformer(config)
tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 10)))
params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
n_params = sum(x.size for x in jax.tree.leaves(params))
print(f"params: {n_params:,}; top-level groups: {sorted(params)}")

# 3. Run it: logits [batch, length, vocab]; keyword flags add MTP logits and router statistics, and
#    mutable=["intermediates"] returns every MoE layer's routing decisions.
(logits, aux), state = jax.jit(
    lambda p, t: model.apply({"params": p}, t, return_mtp=True, return_router_stats=True, mutable=["intermediates"])
)(params, tokens)
print(f"logits: {logits.shape} {logits.dtype}; MTP logits (depth 1): {aux['mtp_logits'][0].shape}")

routing = state["intermediates"]["moe_layers"]["mlp"]["gate"]["routing"][0]
experts = np.asarray(routing["experts"]).reshape(-1, 2, 10, config.num_experts_per_tok)
weights = np.asarray(routing["weights"]).reshape(experts.shape)
for layer in range(experts.shape[0]):
    print(f"MoE layer {config.first_k_dense_replace + layer}, sequence 0:")
    for t in range(3):
        chosen = ", ".join(f"e{e}:{w:.3f}" for e, w in zip(experts[layer, 0, t], weights[layer, 0, t]))
        print(f"  token {t}: {chosen}")
counts = np.asarray(aux["router_stats"]["counts"])
print(f"per-expert load of the first MoE layer over the batch: {counts[0].sum(0).astype(int).tolist()}")

# 4. The MLA cache: decoding keeps only the normed latent c_kv and the shared rope key per token and layer.
for name in ("tiny-v3", "deepseek-v3"):
    c = dsj.presets[name]
    per_layer = c.kv_cache_dim
    mha = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)  # per-head keys (192) and values (128)
    print(f"{name}: MLA cache {per_layer} values/token/layer ({per_layer * c.num_hidden_layers * 2:,} bytes/token "
          f"in bf16 over {c.num_hidden_layers} layers) vs {mha} for full multi-head K/V")
