"""Runtime choices that do not change the architecture: dtypes, remat, scan, MoE dispatch, matmul recipe."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MOE_DISPATCHES = ("auto", "blocked", "ragged", "dense")
MATMUL_RECIPES = ("default", "fp8")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to run a model.

    dtype: compute dtype of activations and matmul inputs ("float32", "bfloat16").
    param_dtype: dtype params are created in by ``init`` (master weights; "float32" by default).
    remat: rematerialization policy of each scanned block: "none", "full" (save nothing), "dots" (save
        matmul outputs), "dots_no_batch" (save matmul outputs without batch dims).
    scan_unroll: ``unroll`` of the layer scans (1 = a loop; the layer count = fully unrolled).
    moe_dispatch: "blocked" sorts token-expert assignments by expert into fixed-size blocks and runs one
        expert per block (dropless, sparse on every backend); "ragged" uses ``jax.lax.ragged_dot`` (a grouped
        GEMM on GPU/TPU, but XLA:CPU expands it densely); "dense" runs every expert on every token (a
        reference, for tests); "auto" picks "ragged" on GPU/TPU and "blocked" on CPU.
    moe_block_size: rows per block for "blocked" (None: chosen from the token count).
    matmul: the recipe behind the one dot_general hook ("default", or "fp8" once that lands).
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1
    moe_dispatch: str = "auto"
    moe_block_size: Optional[int] = None
    matmul: str = "default"

    def __post_init__(self):
        for name, allowed in (("remat", REMAT_POLICIES), ("moe_dispatch", MOE_DISPATCHES), ("matmul", MATMUL_RECIPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelOptions.{name} = {getattr(self, name)!r}: expected one of {allowed}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"ModelOptions.{name} = {getattr(self, name)!r}: not a dtype") from None
        if self.scan_unroll < 1:
            raise ValueError(f"ModelOptions.scan_unroll = {self.scan_unroll}: expected >= 1")
        if self.moe_block_size is not None and self.moe_block_size < 1:
            raise ValueError(f"ModelOptions.moe_block_size = {self.moe_block_size}: expected >= 1")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def resolved_moe_dispatch(self) -> str:
        if self.moe_dispatch != "auto":
            return self.moe_dispatch
        return "blocked" if jax.default_backend() == "cpu" else "ragged"

    def replace(self, **changes) -> "ModelOptions":
        return dataclasses.replace(self, **changes)


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy for a ``ModelOptions.remat`` name (None for "full": save nothing)."""
    cp = jax.checkpoint_policies
    return {
        "full": None,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
    }[name]
