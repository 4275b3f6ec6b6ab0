"""DeepSeek-V3.2's sparse attention at long context on one CPU device: forward and train step, top-k against every
key selected, beside V3's dense (blockwise) attention on the same weights.

    python bench/sparse_attention.py                       # T = 8192 and 32768, index_topk 64
    python bench/sparse_attention.py --lengths 131072 --forward-only

The model is tiny-v3 cut to one dense layer (no MoE, no MTP: attention dominates), as V3.2 with a small indexer (4
heads x 32). Three variants on the same weights and tokens, one row of T tokens:
- ``sparse``: ``index_topk`` (64) keys per query;
- ``all keys``: the same model with ``index_topk = T`` (every visible key selected, through the same sparse path);
- ``dense V3``: the model as V3 (the indexer unused), blockwise attention.
Reported: seconds per forward (and per train step: forward + backward + AdamW), and the ratios sparse / all keys
and sparse / dense. Attention over the selected keys costs O(T k); the indexer's own scoring is O(T^2) by design
(with Hi x Di = 128 multiply-adds per key pair against MLA's H x (R + P)), so the ratio follows k / T only as far
as the indexer's share allows; ``indexer share`` is the time of the indexer's top-k alone over the sparse forward.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import deepseek_jax as dsj
from deepseek_jax.layers.attention.layout import attention_layout
from deepseek_jax.layers.attention.sparse import indexer_topk
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.trainer import Trainer


def config_for(t: int, topk: int):
    return dsj.presets["tiny-v3"].replace(
        model_type="deepseek_v32", num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=0,
        index_topk=topk, index_n_heads=4, index_head_dim=32, max_position_embeddings=max(t, 4096), rope_scaling=None)


def without_indexer(tree):
    """The params tree with every ``indexer`` subtree removed (V3's layout of the same weights)."""
    if not isinstance(tree, dict):
        return tree
    return {k: without_indexer(v) for k, v in tree.items() if k != "indexer"}


def timed(fn, *args, repeats: int):
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--all-keys-max", type=int, default=8192,
                    help="run the every-key variant only up to this length (it gathers T keys per query: O(T^2))")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; index_topk {args.topk}, best of {args.repeats}",
          flush=True)
    for t in args.lengths:
        sparse = config_for(t, args.topk)
        variants = {"sparse": sparse, "all keys": sparse.replace(index_topk=t),
                    "dense V3": sparse.replace(model_type="deepseek_v3")}
        if t > args.all_keys_max:
            del variants["all keys"]
        tokens = jnp.asarray(np.random.RandomState(0).randint(3, sparse.vocab_size, (1, t)), jnp.int32)
        params = nn.meta.unbox(dsj.Transformer(sparse).init(jax.random.PRNGKey(0), tokens[:, :8])["params"])
        fwd, step = {}, {}
        for name, config in variants.items():
            p = params if config.has_indexer else without_indexer(params)
            model = dsj.Transformer(config)
            f = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
            fwd[name] = timed(f, p, tokens, repeats=args.repeats)
            if not args.forward_only:
                tc = TrainConfig(batch_size=1, seq_len=t, precision="fp32", mtp_weight=0.0)
                trainer = Trainer(config, tc, make_mesh())
                state = trainer.state_from_params(jax.tree.map(jnp.copy, p))
                batch = trainer.put_batch({"inputs": np.asarray(tokens), "targets": np.asarray(tokens),
                                           "positions": np.arange(t, dtype=np.int32)[None],
                                           "segment_ids": np.ones((1, t), np.int32),
                                           "loss_mask": np.ones((1, t), np.float32)})
                run = trainer.step_fn(state)
                state, _ = run(state, batch)  # compile
                jax.block_until_ready(state)
                t0 = time.perf_counter()
                state, m = run(state, batch)
                jax.block_until_ready(m)
                step[name] = time.perf_counter() - t0
            print(f"T {t:>7,}  {name:<9} forward {fwd[name]:8.3f} s" +
                  (f"   train step {step[name]:8.3f} s" if step else ""), flush=True)
        # The indexer's own top-k over the whole row (its O(T^2) part), on the sparse model's shapes.
        c = sparse
        qi = jnp.ones((1, t, c.index_n_heads, c.index_head_dim), jnp.float32)
        ki = jnp.ones((1, t, c.index_head_dim), jnp.float32)
        wi = jnp.ones((1, t, c.index_n_heads), jnp.float32)
        layout = attention_layout(jnp.ones((1, t), jnp.int32))
        topk = jax.jit(lambda q, k, w: indexer_topk(q, k, w, layout, c.index_topk, 0.1, 128,
                                                    dsj.ModelOptions().attention_block))
        idx_s = timed(topk, qi, ki, wi, repeats=args.repeats)
        def ratios(times):
            out = [f"sparse / {other} {times['sparse'] / times[other]:.3f}" for other in ("all keys", "dense V3")
                   if other in times]
            return ", ".join(out)

        line = (f"T {t:>7,}  forward {ratios(fwd)} (k / T = {args.topk / t:.4f}); indexer share of the sparse "
                f"forward {idx_s / fwd['sparse']:.2f}")
        if step:
            line += f"; train step {ratios(step)}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
