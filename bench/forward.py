"""Forward-pass throughput: deepseek-jax (jit, CPU) vs transformers' DeepseekV3ForCausalLM on the same weights.

    python bench/forward.py            # tiny-v3 and a ~100M-parameter V3-shaped config
    python bench/forward.py --quick    # tiny-v3 only

Both run in fp32 on the same CPU threads, same tokens; logits are checked to agree before timing.
Prints tokens/s for each and the ratio (ours / transformers).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from hf_reference import hf_model  # noqa: E402

import deepseek_jax as dsj  # noqa: E402

BENCH_100M = dsj.presets["tiny-v3"].replace(
    vocab_size=32000, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
    num_nextn_predict_layers=0,
)


def _time(fn, repeats):
    fn()  # warm-up (and compile)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def reference_and_ours(config):
    """transformers' model with random weights, and the same weights loaded by us from its saved checkpoint:
    ``(reference, our config, our params)``."""
    ref = hf_model(config, seed=0, bias_scale=0.05)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(d)
        cfg, params = dsj.load_pretrained(d)
    return ref, cfg, params


def bench(name, config, batch, length, repeats=3):
    ref, cfg, params = reference_and_ours(config)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (batch, length))
    model = dsj.Transformer(cfg)
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t))
    tok_j = jnp.asarray(tokens)
    tok_t = torch.as_tensor(tokens)
    with torch.no_grad():
        expected = ref(tok_t).logits.numpy()
    diff = np.abs(np.asarray(fwd(params, tok_j)) - expected).max()
    ours = _time(lambda: fwd(params, tok_j).block_until_ready(), repeats)
    with torch.no_grad():
        theirs = _time(lambda: ref(tok_t), repeats)
    n = batch * length
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"{name:10s} params={n_params / 1e6:7.1f}M batch={batch} len={length}  ours {n / ours:9.0f} tok/s  "
          f"transformers {n / theirs:9.0f} tok/s  ratio {theirs / ours:5.2f}x  max|dlogits|={diff:.1e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads")
    bench("tiny-v3", dsj.presets["tiny-v3"].replace(num_nextn_predict_layers=0), 4, 128)
    if not args.quick:
        bench("v3-100M", BENCH_100M, 4, 256)
        bench("v3-100M", BENCH_100M, 1, 1024)


if __name__ == "__main__":
    main()
