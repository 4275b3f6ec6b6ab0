"""deepseek-jax: DeepSeek V2 / V2-Lite / V3 / R1 and the R1-Distill students in JAX and Flax.

The package's folders are its architecture (docs/architecture.md): ``config`` -> ``parallel`` / ``quant`` ->
``layers`` -> ``moe`` -> ``models`` -> ``checkpoint`` / ``data`` -> ``inference`` / ``training`` -> ``posttrain``
/ ``tools`` -> ``cli``. The public surface is re-exported here.
"""

from deepseek_jax import lm_eval as _lm_eval
from deepseek_jax.checkpoint.load import load_pretrained
from deepseek_jax.config import (
    ConfigError,
    LoraOptions,
    ModelConfig,
    ModelOptions,
    RopeScaling,
    presets,
)
from deepseek_jax.inference.generation import generate
from deepseek_jax.layers.attention.layout import attention_layout, attention_mask
from deepseek_jax.models.block import Block
from deepseek_jax.models.transformer import Transformer

_lm_eval.register()  # lm-evaluation-harness's model "deepseek-jax", when lm-eval is installed

__version__ = "0.1.0"

__all__ = [
    "Block", "ConfigError", "LoraOptions", "ModelConfig", "ModelOptions", "RopeScaling", "Transformer",
    "attention_layout", "attention_mask", "generate", "load_pretrained", "presets",
]
