"""An R1-Distill-Qwen-1.5B-shaped student, deepseek-jax vs transformers, same random weights, same CPU, one run.

    python bench/students.py                 # 4 of the 28 layers (memory: both models in fp32 at once)
    python bench/students.py --layers 28     # the full shape (about 7.1 GB per framework in fp32)

The config is the ``r1-distill-qwen-1.5b`` preset (hidden 1536, 12 query / 2 key-value heads, q/k/v bias,
MLP 8960, vocabulary 151,936, untied head) with ``--layers`` layers. Random weights (transformers' init, biases
drawn non-zero) are built once in transformers' ``Qwen2ForCausalLM`` and handed to ours through the converter's
name map (``checkpoint.hf_tensor_map``), so both run the same numbers in fp32:
  forward: logits of a ``--batch`` x ``--prompt`` prompt (ours: the jitted ``Transformer.apply``; transformers:
           ``model(ids)``, sdpa attention);
  greedy:  ``--new`` new tokens after the prompt (ours: ``dsj.generate`` over the GQA KV cache; transformers:
           ``model.generate(do_sample=False)`` with its DynamicCache), prefill included.
Timings are the best of ``--repeats`` after a warm-up (compilation excluded). Both use all the machine's cores.
Prints the logits' max difference, whether the greedy tokens agree, and a markdown table with the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from generate import _best  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.checkpoint.hf_dir import set_leaf
from deepseek_jax.checkpoint.hf_map import hf_tensor_map  # noqa: E402


def build(layers: int, seed: int = 0):
    """(config, our params, transformers model) with the same random fp32 weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = dsj.presets["r1-distill-qwen-1.5b"].replace(num_hidden_layers=layers)
    d = config.to_hf_dict()
    d.pop("rope_scaling")
    hf_cfg = Qwen2Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    state = model.state_dict()
    params: dict = {}
    for tm in hf_tensor_map(config):
        leaf = np.empty(tm.shape, np.float32)
        for key, index in tm.sources:
            leaf[index] = tm.to_ours(state[key].numpy())
        set_leaf(params, tm.path, jnp.asarray(leaf))
        del leaf
    return config, params, model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    config, params, model = build(args.layers)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.prompt))
    ids = torch.as_tensor(tokens, dtype=torch.long)

    forward = jax.jit(dsj.Transformer(config).apply)
    ours_logits = np.asarray(forward({"params": params}, jnp.asarray(tokens)))
    with torch.no_grad():
        theirs_logits = model(ids).logits.numpy()
    diff = float(np.abs(ours_logits - theirs_logits).max())
    del ours_logits, theirs_logits

    t_ours_fwd = _best(lambda: forward({"params": params}, jnp.asarray(tokens)).block_until_ready(), args.repeats)

    def theirs_fwd():
        with torch.no_grad():
            model(ids)

    t_theirs_fwd = _best(theirs_fwd, args.repeats)

    prompts = tokens.tolist()
    result = {}

    def ours_gen():
        result["ours"] = dsj.generate(config, params, prompts, max_new_tokens=args.new, eos_token_id=None).tokens

    def theirs_gen():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        result["theirs"] = out[:, args.prompt:].tolist()

    t_ours_gen = _best(ours_gen, args.repeats)
    t_theirs_gen = _best(theirs_gen, args.repeats)
    agree = result["ours"] == result["theirs"]

    fwd_tok = args.batch * args.prompt
    gen_tok = args.batch * args.new
    print(f"R1-Distill-Qwen-1.5B shape, {args.layers} of 28 layers, {n_params:,} params, fp32, random weights; "
          f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPU cores ({platform.processor()})")
    print(f"logits max |ours - transformers| = {diff:.2e}; greedy tokens identical: {agree}")
    print()
    print("| step | shape | deepseek-jax | transformers | ours / theirs (speed) |")
    print("|---|---|---:|---:|---:|")
    print(f"| forward | {args.batch} x {args.prompt} | {t_ours_fwd * 1e3:,.0f} ms ({fwd_tok / t_ours_fwd:,.0f} tok/s) | "
          f"{t_theirs_fwd * 1e3:,.0f} ms ({fwd_tok / t_theirs_fwd:,.0f} tok/s) | {t_theirs_fwd / t_ours_fwd:.2f}x |")
    print(f"| greedy (prefill + {args.new} new) | {args.batch} x {args.prompt} | {t_ours_gen:,.2f} s "
          f"({gen_tok / t_ours_gen:,.1f} new tok/s) | {t_theirs_gen:,.2f} s ({gen_tok / t_theirs_gen:,.1f} new tok/s) | "
          f"{t_theirs_gen / t_ours_gen:.2f}x |")


if __name__ == "__main__":
    main()
