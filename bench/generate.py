"""Inference throughput: prefill and decode tokens/s, deepseek-jax vs transformers, same weights, same CPU.

    python bench/generate.py                  # batch 1 and 8, context 128, 1024, 4096
    python bench/generate.py --contexts 128   # a quick run

For each (batch, context): prefill tokens/s (the whole prompt in one call) and decode tokens/s (greedy,
one token per sequence per step, over a cache already holding ``context`` tokens), for
  ours:         jitted prefill (full MLA path) + absorbed decode over the latent cache (fp32);
  ours-naive:   the same decode expanding the latent cache to per-head keys/values every step;
  transformers: DeepseekV3ForCausalLM (fp32, sdpa attention) with its DynamicCache (5.x caches the latent
                c_kv and rope key too, and expands them to per-head keys/values every step).
Also the KV cache bytes per token of each. Both frameworks use all the machine's cores; timings are the
best of a few repeats after a warm-up (compilation excluded). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
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
from deepseek_jax.inference import generation
from deepseek_jax.inference import steps as decode
from deepseek_jax.inference.sampling import SamplingParams  # noqa: E402
from deepseek_jax.layers import kv_cache as kvcache  # noqa: E402

# A small V3-shaped model (MLA with q-LoRA, YaRN, 1 dense + 3 MoE layers with grouped sigmoid routing).
BENCH_CONFIG = dsj.presets["tiny-v3"].replace(
    vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=128, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
    num_nextn_predict_layers=0, max_position_embeddings=8192,
)
GREEDY = SamplingParams()
OPTIONS = dsj.ModelOptions()


def _best(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def ours_prefill(params, config, tokens, repeats):
    b, t = tokens.shape
    lengths = jnp.full((b,), t, jnp.int32)
    slots = decode.cache_length(t, 64)
    caches = [kvcache.init_cache(config, b, slots) for _ in range(repeats + 1)]

    def run():
        cache, logits, _ = decode.prefill(params, caches.pop(), tokens, lengths, config=config, options=OPTIONS)
        logits.block_until_ready()
        return cache

    return t * b / _best(run, repeats)


def ours_decode(params, config, tokens, steps, absorb):
    b, t = tokens.shape
    lengths = jnp.full((b,), t, jnp.int32)
    cache = kvcache.init_cache(config, b, decode.cache_length(t, 2 * steps + 8))
    cache, logits, _ = decode.prefill(params, cache, tokens, lengths, config=config, options=OPTIONS)
    tok, pos = jnp.argmax(logits, -1).astype(jnp.int32), lengths
    seen = jnp.zeros((b, config.vocab_size), jnp.bool_)
    key = jax.random.PRNGKey(0)
    state = {"cache": cache, "tok": tok, "pos": pos, "seen": seen}

    def step():
        s = state
        s["cache"], s["tok"], s["seen"], _ = generation._decode_sample_jit(
            params, s["cache"], s["tok"], s["pos"], s["seen"], key, config=config, options=OPTIONS,
            sampling=GREEDY, absorb=absorb)
        s["pos"] = s["pos"] + 1
        np.asarray(s["tok"])  # the host needs each token (streaming, stop checks)

    step(), step()  # compile, warm up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return b * steps / (time.perf_counter() - t0), kvcache.cache_bytes_per_token(config, "float32")


@torch.no_grad()
def hf_prefill(model, tokens, repeats):
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    return ids.numel() / _best(lambda: model(ids, use_cache=True), repeats)


@torch.no_grad()
def hf_decode(model, tokens, steps):
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    out = model(ids, use_cache=True)
    pkv = out.past_key_values
    nbytes = sum(t.numel() * t.element_size() for layer in pkv.layers for t in (layer.keys, layer.values))
    per_token = nbytes / ids.numel()
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(2):  # warm up
        out = model(nxt, past_key_values=pkv, use_cache=True)
        pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(nxt, past_key_values=pkv, use_cache=True)
        pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        nxt.numpy()
    return ids.shape[0] * steps / (time.perf_counter() - t0), per_token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per point")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    config = BENCH_CONFIG
    torch.manual_seed(0)
    ref = hf_model(config, seed=0, bias_scale=0.05)
    ref.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(d)
        _, params = dsj.load_pretrained(d)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    # Same weights: the logits agree before anything is timed.
    probe = np.random.RandomState(0).randint(0, config.vocab_size, (1, 32))
    with torch.no_grad():
        want = ref(torch.as_tensor(probe)).logits.numpy()
    got = decode.decode_all_positions(params, jnp.asarray(probe), config=config, prefill_len=16)
    diff = float(np.abs(np.asarray(got) - want).max())
    assert diff < 1e-3, diff

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, {os.cpu_count()} CPU "
          f"cores; jax {jax.__version__}, torch {torch.__version__}; model {n_params / 1e6:.1f}M params "
          f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
          f"kv_lora {config.kv_lora_rank}, rope {config.qk_rope_head_dim}); logits agree to {diff:.1e}")
    print("| batch | context | prefill ours | prefill HF | ratio | decode ours | decode naive | decode HF | "
          "ratio | absorbed/naive |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    kv = {}
    for b in args.batches:
        for t in args.contexts:
            tokens = jnp.asarray(np.random.RandomState(t + b).randint(0, config.vocab_size, (b, t)), jnp.int32)
            steps = args.steps if t < 4096 else max(args.steps // 2, 4)
            p_ours = ours_prefill(params, config, tokens, args.repeats)
            p_hf = hf_prefill(ref, tokens, args.repeats)
            d_ours, kv["ours"] = ours_decode(params, config, tokens, steps, absorb=True)
            d_naive, _ = ours_decode(params, config, tokens, steps, absorb=False)
            d_hf, kv["transformers"] = hf_decode(ref, tokens, steps)
            print(f"| {b} | {t} | {p_ours:,.0f} | {p_hf:,.0f} | {p_ours / p_hf:.2f} | {d_ours:,.1f} | "
                  f"{d_naive:,.1f} | {d_hf:,.1f} | {d_ours / d_hf:.2f} | {d_ours / d_naive:.2f} |", flush=True)
    v3 = dsj.presets["deepseek-v3"]
    hf_v3 = v3.num_hidden_layers * v3.num_attention_heads * (v3.qk_head_dim + v3.v_head_dim) * 2
    print(f"\nKV cache bytes per token (fp32, this model): ours {kv['ours']:,}, transformers "
          f"{kv['transformers']:,.0f} ({kv['transformers'] / kv['ours']:.1f}x). DeepSeek-V3 in bf16: ours "
          f"{kvcache.cache_bytes_per_token(v3, 'bfloat16'):,} (576 x 61 x 2), fp8 "
          f"{kvcache.cache_bytes_per_token(v3, 'fp8'):,}; a per-head K/V (MHA-style) cache would be "
          f"{hf_v3:,} (128 heads x (192 + 128) x 61 x 2, {hf_v3 / kvcache.cache_bytes_per_token(v3, 'bfloat16'):.0f}x)")


if __name__ == "__main__":
    main()
