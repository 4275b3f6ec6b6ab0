"""Tiny random checkpoints shared by the inference tests (built once per test session, then cached).

Each is a transformers model with sharper-than-default random weights (so greedy argmaxes are not near
ties), saved with ``save_pretrained`` (plus an MTP layer for V3) and loaded with ``load_pretrained``.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import warnings

import deepseek_jax as dsj
from hf_reference import hf_model, hf_mtp_model, save_with_mtp

# Prompts of mixed lengths (one of a single token) shared by the tests, so they share compiled steps.
PROMPTS = [[5, 17, 300, 2, 9, 44, 1, 8, 77, 3, 120], [3], [250, 11, 60, 2, 7, 7, 100]]


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(name: str, seed: int = 0):
    """``(config, params, hf_model, directory)`` for preset ``name``; V3 checkpoints carry an MTP layer."""
    config = dsj.presets[name]
    hf = hf_model(config, seed=seed, bias_scale=0.05 if config.model_type == "deepseek_v3" else 0.0,
                  init_std=0.1)
    path = tempfile.mkdtemp(prefix=f"dsj-{name}-")
    atexit.register(shutil.rmtree, path, True)
    if config.num_nextn_predict_layers > 0:
        save_with_mtp(hf, hf_mtp_model(hf, seed=seed + 1), path)
    else:
        hf.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_config, params = dsj.load_pretrained(path)
    return loaded_config, params, hf, path
