"""deepseek-jax: DeepSeek V2 / V2-Lite / V3 / R1 in JAX and Flax."""

from .block import Block
from .checkpoint import load_pretrained
from .config import ConfigError, ModelConfig, RopeScaling, presets
from .generation import generate
from .model import Transformer, attention_layout, attention_mask
from .options import ModelOptions

__version__ = "0.1.0"

__all__ = [
    "Block", "ConfigError", "ModelConfig", "ModelOptions", "RopeScaling", "Transformer", "attention_layout",
    "attention_mask",
    "generate", "load_pretrained", "presets",
]
