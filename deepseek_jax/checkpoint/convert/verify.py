"""``--verify``: our model on the converted params vs transformers on the HF checkpoint, same prompts.

transformers reads the HF directory itself; for sources it cannot read directly (FP8 block-quantized
weights, PyTorch state dicts) we first write a dequantized fp32 safetensors copy to a temp directory, so
this is meant for models that fit in memory twice. Prompts are fixed pseudo-random token ids (no tokenizer
needed); the result is the max absolute logit difference.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from deepseek_jax.checkpoint.hf_dir import INDEX_FILE, SINGLE_FILE


def prompts(vocab_size: int, n: int = 3, length: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab_size, (n, length)).astype(np.int32)


def _plain_hf_dir(src: str, config_file: str | None, tmp: str) -> str:
    """``src`` if transformers can load it as is, else a dequantized fp32 safetensors copy in ``tmp``."""
    from deepseek_jax.checkpoint.convert.convert import open_source
    from deepseek_jax.checkpoint.convert.export import OutTensor, write_sharded

    with open(config_file or os.path.join(src, "config.json")) as f:
        d = json.load(f)
    plain = os.path.isdir(src) and (os.path.exists(os.path.join(src, INDEX_FILE)) or
                                   os.path.exists(os.path.join(src, SINGLE_FILE)))
    if plain and "quantization_config" not in d:
        return src
    source = open_source(src, config_file)
    ckpt = source.ckpt
    tensors = [OutTensor(k, tuple(ckpt.shape(k)), np.dtype(np.float32),
                         lambda k=k: np.asarray(ckpt.read(k), np.float32)) for k in ckpt.keys]
    write_sharded(tmp, tensors, 2**62)
    d.pop("quantization_config", None)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(d, f)
    return tmp


def hf_logits(hf_dir: str, tokens: np.ndarray) -> np.ndarray:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise RuntimeError("--verify needs torch and transformers (pip install 'deepseek-jax[test]')") from None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the MTP layer's keys are "unexpected" to transformers, by design
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def our_logits(converted_dir: str, tokens: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    from deepseek_jax.checkpoint.load import load_pretrained
    from deepseek_jax.models.transformer import Transformer

    config, params = load_pretrained(converted_dir, dtype=jnp.float32)
    return np.asarray(Transformer(config).apply({"params": params}, jnp.asarray(tokens)))


def verify(converted_dir: str, hf_src: str, config_file: str | None = None, n_prompts: int = 3,
           length: int = 16) -> float:
    """Max |logits(ours on converted_dir) - logits(transformers on hf_src)| over a few prompts."""
    from deepseek_jax.config.model import ModelConfig

    config = ModelConfig.from_pretrained(converted_dir)
    tokens = prompts(config.vocab_size, n_prompts, length)
    tmp = tempfile.mkdtemp(prefix=".verify-")
    try:
        hf = hf_logits(_plain_hf_dir(hf_src, config_file, tmp), tokens)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ours = our_logits(converted_dir, tokens)
    return float(np.abs(ours - hf).max())
