"""What a model is (``ModelConfig``, HF field names, presets) and how it runs (``ModelOptions``)."""

from deepseek_jax.config.model import (
    ConfigError,
    ModelConfig,
    RopeScaling,
    read_config_json,
)
from deepseek_jax.config.options import LoraOptions, ModelOptions, remat_policy
from deepseek_jax.config.presets import presets

__all__ = ["ConfigError", "LoraOptions", "ModelConfig", "ModelOptions", "RopeScaling", "presets", "read_config_json",
           "remat_policy"]
