"""Long context on CPU: blockwise vs naive attention, chunked prefill, and a 4k prefill against transformers.

    python bench/long_context.py            # tiny-v3 at 8k and 32k tokens, then the ~100M config at 4k
    python bench/long_context.py --quick    # 8k only, no transformers

Part 1, tiny-v3 (fp32, one sequence): for the prefill (``decode.prefill``: the forward that fills the latent
cache) and for the training gradient, the compiled per-step bytes (arguments + outputs + temporaries from
``memory_analysis``) with the naive core (the whole ``[H, T, T]`` score matrix), the blockwise core (online
softmax, blocks of 512) and, for the prefill, chunks of 2048 tokens; tokens/s where it fits in this machine's RAM.
Part 2, the ~100M V3-shaped config of bench/forward.py at 1 x 4096: our prefill against transformers'
``DeepseekV3ForCausalLM`` forward with ``use_cache=True`` on the same weights and tokens (logits at the last
token checked first), tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from forward import _time  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.inference import steps as decode
from deepseek_jax.layers import kv_cache as kvcache  # noqa: E402

RAM_BUDGET = 12e9  # run (not only compile) what needs less than this


def _bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)




def prefill_case(config, params, t: int, attention: str, chunk):
    options = dsj.ModelOptions(attention=attention)
    cache = kvcache.init_cache(config, 1, t, mtp=False)
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, config.vocab_size, (1, t)), jnp.int32)
    lengths = jnp.asarray([t], jnp.int32)
    fn = jax.jit(lambda p, c, x, n: decode.prefill_core(p, c, x, n, config=config, options=options, chunk=chunk))
    compiled = fn.lower(params, cache, tokens, lengths).compile()
    need = _bytes(compiled)
    rate = None
    if need < RAM_BUDGET:
        rate = t / _time(lambda: jax.block_until_ready(compiled(params, cache, tokens, lengths)), 2)
    return need, rate


def grad_case(config, params, t: int, attention: str):
    model = dsj.Transformer(config, dsj.ModelOptions(attention=attention))
    tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def loss(p, x):
        return model.apply({"params": p}, x).astype(jnp.float32).mean()

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    return _bytes(jax.jit(jax.grad(loss)).lower(abstract, tokens).compile())


def part1(lengths):
    config = dsj.presets["tiny-v3"].replace(num_nextn_predict_layers=0, max_position_embeddings=65536)
    boxed = dsj.Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    params = nn.meta.unbox(boxed)
    print("tiny-v3, 1 sequence, fp32; GB = compiled arguments + outputs + temporaries")
    print(f"{'step':9s} {'tokens':>7s} {'core':28s} {'GB':>8s} {'tokens/s':>10s}")
    for t in lengths:
        for label, attention, chunk in (("naive", "naive", None), ("blockwise", "blockwise", None),
                                        ("blockwise, chunks of 2048", "blockwise", 2048)):
            need, rate = prefill_case(config, params, t, attention, chunk)
            print(f"{'prefill':9s} {t:7d} {label:28s} {need / 1e9:8.2f} {rate if rate else float('nan'):10.0f}",
                  flush=True)
        for attention in ("naive", "blockwise"):
            print(f"{'gradient':9s} {t:7d} {attention:28s} {grad_case(config, params, t, attention) / 1e9:8.2f}",
                  flush=True)


def part2(t: int = 4096):
    import torch
    from forward import BENCH_100M, reference_and_ours

    ref, cfg, params = reference_and_ours(BENCH_100M.replace(max_position_embeddings=8192))
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, t))
    options = dsj.ModelOptions()
    cache = kvcache.init_cache(cfg, 1, t, mtp=False)
    fn = jax.jit(lambda p, c, x, n: decode.prefill_core(p, c, x, n, config=cfg, options=options))
    args = (params, cache, jnp.asarray(tokens, jnp.int32), jnp.asarray([t], jnp.int32))
    _, logits, _ = fn(*args)
    tok_t = torch.as_tensor(tokens)
    with torch.no_grad():
        expected = ref(tok_t, use_cache=True).logits[:, -1].numpy()
        theirs = _time(lambda: ref(tok_t, use_cache=True), 2)
    ours = _time(lambda: jax.block_until_ready(fn(*args)), 2)
    diff = float(np.abs(np.asarray(logits) - expected).max())
    print(f"\n~100M V3-shaped config, prefill 1 x {t}: ours {t / ours:.0f} tok/s, transformers {t / theirs:.0f} tok/s, "
          f"ratio {theirs / ours:.2f}x (max |d logits| at the last token {diff:.1e})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    part1([8192] if args.quick else [8192, 32768])
    if not args.quick:
        part2()


if __name__ == "__main__":
    main()
