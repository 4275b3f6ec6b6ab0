"""Checkpoint conversion (installed as ``deepseek_jax.convert``)."""
