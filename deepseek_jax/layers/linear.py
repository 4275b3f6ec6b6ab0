"""Linear layers and the single dot_general hook every matmul of the model goes through.

A ``MatmulRecipe`` turns ``(lhs, rhs, dimension_numbers)`` into the product. The default recipe casts both
inputs to the compute dtype and accumulates in fp32; the fp8 training recipe plugs in here (and only here).
Embedding, output head, router and attention core are kept out of the recipe on purpose (DeepSeek-V3
report, section 3.3: they stay in high precision).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.lora import LoraRecipe, lora_kernel, module_path
from deepseek_jax.ops import DimensionNumbers, contract_last
from deepseek_jax.parallel.mesh import current_mesh
from deepseek_jax.parallel.rules import current_rules, mesh_axes_for, token_axes
from deepseek_jax.quant.kernel import block_sizes, fp8_weight_matmul
from deepseek_jax.quant.recipe import Fp8Recipe
from deepseek_jax.quant.weights import Fp8Weight, block_aligned_specs


class MatmulRecipe:
    """The default recipe: inputs in the compute dtype, fp32 accumulation, output in the compute dtype."""

    def __init__(self, dtype, out_dtype=None, fp8_kernel: Optional[str] = None, platform: Optional[str] = None):
        self.dtype = jnp.dtype(dtype)
        # The backend the step is compiled for (``ModelOptions.target_platform``); on "cpu" the weight gradient
        # of ``x @ kernel`` is formed as XLA:CPU's fast matmul takes it (``_cpu_weight_grad_dot``).
        self.platform = platform
        # Kernels kept as FP8 (``quant/weights.py``'s ``Fp8Weight``): "tpu" / "interpret" runs the Pallas
        # kernel of ``quant/kernel.py`` (dequantization per block inside it) compiled or interpreted; None
        # dequantizes in XLA.
        self.fp8_kernel = fp8_kernel
        self.out_dtype = self.dtype if out_dtype is None else jnp.dtype(out_dtype)
        # fp32 compute means real fp32 (no TF32 on GPU); lower dtypes take the backend default.
        self.precision = jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None
        # A 16-bit output comes straight out of the dot, which still accumulates in fp32 (TPU and GPU natively;
        # XLA:CPU upcasts, and may differ from a cast fp32 result in the last bit: 3 of 4096 values of a bf16
        # [64, 8192] x [8192, 64], with the same maximum error against fp64). Asking for fp32 and casting would
        # make the backward pass carry fp32 cotangents: fp32 copies of every activation-sized operand (the MoE's
        # dispatch buffers above all: 7 GiB each per chip for V3 at 4k tokens a device).
        low = self.out_dtype.itemsize < 4 and jnp.issubdtype(self.out_dtype, jnp.floating)
        self.accum = self.out_dtype if low else jnp.float32

    def dot_general(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: DimensionNumbers) -> jax.Array:
        if self.fp8_kernel is not None and _kernel_applies(lhs, rhs, dimension_numbers):
            return self._fp8_kernel_dot(lhs, rhs, None)
        a, b = lhs.astype(self.dtype), rhs.astype(self.dtype)
        n_in = _kernel_contraction(a, b, dimension_numbers)
        if n_in and self.platform == "cpu" and _unsharded():
            out = _cpu_weight_grad_dot(a, b, n_in, self.precision, self.accum)
        else:
            out = jax.lax.dot_general(a, b, dimension_numbers, precision=self.precision,
                                      preferred_element_type=self.accum)
        return out.astype(self.out_dtype)

    def linear(self, x: jax.Array, kernel, n_in: int, axes: Optional[Sequence[str]] = None) -> jax.Array:
        """``x @ kernel`` over x's last ``n_in`` dims; ``axes``: the kernel's logical axis names, which place an
        FP8-kept kernel's Pallas matmul on its shards under a mesh."""
        dims = contract_last(n_in, x.ndim)
        if self.fp8_kernel is not None and _kernel_applies(x, kernel, dims):
            return self._fp8_kernel_dot(x, kernel, axes)
        return self.dot_general(x, kernel, dims)

    def _fp8_kernel_dot(self, lhs, rhs, axes) -> jax.Array:
        k, out_dims = math.prod(lhs.shape[lhs.ndim - rhs.n_in:]), rhs.shape[rhs.n_in:]
        mesh, specs = _fp8_kernel_layout(lhs, rhs, axes)
        out = fp8_weight_matmul(lhs.reshape(-1, k), rhs.q.reshape(k, -1), rhs.scale, self.dtype, self.out_dtype,
                                self.fp8_kernel == "interpret", mesh, specs)
        return out.reshape(lhs.shape[:lhs.ndim - rhs.n_in] + tuple(out_dims))

    def ragged_dot(self, lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """Grouped matmul ``[M, K] x [G, K, N] -> [M, N]``, rows of ``lhs`` grouped by ``group_sizes``."""
        out = jax.lax.ragged_dot(
            lhs.astype(self.dtype), rhs.astype(self.dtype), group_sizes,
            precision=self.precision, preferred_element_type=self.accum,
        )
        return out.astype(self.out_dtype)


def _kernel_contraction(lhs, rhs, dimension_numbers) -> int:
    """n when ``dimension_numbers`` is ``x @ kernel`` (x's last n dims with the kernel's first n, no batch dims) and
    the kernel has output dims; else 0."""
    (lc, rc), (lb, rb) = (tuple(map(tuple, d)) for d in dimension_numbers)
    n = len(lc)
    if lb or rb or not n or n >= rhs.ndim or n >= lhs.ndim:
        return 0
    if lc != tuple(range(lhs.ndim - n, lhs.ndim)) or rc != tuple(range(n)):
        return 0
    return n


def _unsharded() -> bool:
    """No mesh of more than one device is in effect (inside ``shard_map`` every array is a device's own)."""
    mesh = current_mesh()
    return mesh is None or bool(getattr(mesh, "manual_axes", ()))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_weight_grad_dot(x, w, n_in, precision, accum):
    """``x @ w`` over x's last ``n_in`` dims, as ``lax.dot_general``; in the backward pass the kernel's gradient
    ``x^T g`` is a plain ``[K, M] x [M, N]`` product of a transposed copy of x.

    jax's transpose of the dot gives ``dot_general(x, g)`` contracting the token dims of both (x's dim 0, a
    "transposed" lhs), and XLA:CPU lays that out as a product of two transposed operands that its fast matmul
    path (XNNPACK) does not take: it runs in Eigen at 1.5-4x lower throughput than the plain form (the 88M bench
    config's output head, ``[1024, 512]^T x [1024, 32000]``: 61 against 231-297 GFLOP/s on 2 cores), and was the
    single largest op of the gradient after the MoE (bench/backward.py). The transposed copy of x (``[M, K]``,
    the size of the layer's input) is kept apart by an optimization barrier, or XLA folds it back into the dot.
    Values: the same products and sums, in the matmul's own order (fp32 rounding)."""
    return jax.lax.dot_general(x, w, contract_last(n_in, x.ndim), precision=precision, preferred_element_type=accum)


def _cpu_weight_grad_dot_fwd(x, w, n_in, precision, accum):
    return _cpu_weight_grad_dot(x, w, n_in, precision, accum), (x, w)


def _cpu_weight_grad_dot_bwd(n_in, precision, accum, res, g):
    x, w = res
    k = math.prod(w.shape[:n_in])
    out_dims = tuple(range(x.ndim - n_in, g.ndim))  # g [..., *w's output dims]
    w_out = tuple(range(n_in, w.ndim))
    dx = jax.lax.dot_general(g, w, ((out_dims, w_out), ((), ())), precision=precision,
                             preferred_element_type=accum)
    x_t = jax.lax.optimization_barrier(x.reshape(-1, k).T)  # [K, M]
    dw = jax.lax.dot_general(x_t, g.reshape(x_t.shape[1], -1), (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=accum)
    return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_cpu_weight_grad_dot.defvjp(_cpu_weight_grad_dot_fwd, _cpu_weight_grad_dot_bwd)


def _kernel_applies(lhs, rhs, dimension_numbers) -> bool:
    """A plain ``x @ kernel`` (the last ``n_in`` dims of x with the first of an FP8-kept kernel of one layer) whose
    2-D view the FP8 kernel tiles."""
    if type(rhs) is not Fp8Weight or rhs.ndim != rhs.n_in + rhs.n_out:  # FP8 only (an Fp4Weight is dequantized)
        return False
    if tuple(map(tuple, dimension_numbers[0])) != tuple(map(tuple, contract_last(rhs.n_in, lhs.ndim)[0])) or any(
            dimension_numbers[1]):
        return False
    k, n = math.prod(rhs.shape[:rhs.n_in]), math.prod(rhs.shape[rhs.n_in:])
    return block_sizes(math.prod(lhs.shape[:lhs.ndim - rhs.n_in]), k, n) is not None


def _fp8_kernel_layout(x, kernel, axes):
    """``(mesh, (x rows' axes, K's axes, N's axes))`` for the FP8 kernel under the mesh in effect (None outside
    one, inside ``shard_map``, or without the kernel's logical ``axes``): the kernel's axes from the logical
    rules, on 128-block edges as ``load_pretrained(..., dtype="fp8")`` places it; x's rows as activations are
    split (the batch axes that divide the batch, then the context axes where they divide the sequence)."""
    mesh = current_mesh()
    none = (None, (None, None, None))
    if axes is None or mesh is None or getattr(mesh, "manual_axes", ()):
        return none
    spec = mesh_axes_for(tuple(axes), kernel.shape, mesh, current_rules())
    q_spec, _ = block_aligned_specs(spec, kernel.shape, kernel.n_in, kernel.n_out, mesh.shape)
    q_spec = tuple(q_spec) + (None,) * (kernel.ndim - len(tuple(q_spec)))
    lead = x.shape[:x.ndim - kernel.n_in]
    rows = token_axes(mesh, lead[0], lead[1] if len(lead) > 1 else None)
    return mesh, (rows or None, q_spec[0], q_spec[kernel.n_in])


def fp8_kernel_mode(options: ModelOptions) -> Optional[str]:
    """How matmuls on FP8-kept kernels run under ``options`` (see ``MatmulRecipe.fp8_kernel``)."""
    tpu = options.target_platform() == "tpu"
    if options.fp8_weight_matmul == "auto":
        return "tpu" if tpu else None
    if options.fp8_weight_matmul == "pallas":
        return "tpu" if tpu else "interpret"
    return None


def matmul_recipe(options: ModelOptions) -> MatmulRecipe:
    """The recipe of the model's linear layers and experts under ``options`` (with LoRA: wrapped to multiply by
    ``LoraWeight``s as well)."""
    if options.matmul == "default":
        recipe = MatmulRecipe(options.compute_dtype, fp8_kernel=fp8_kernel_mode(options),
                              platform=options.target_platform())
    elif options.matmul == "fp8":
        recipe = Fp8Recipe(options.compute_dtype)
    else:
        raise NotImplementedError(f"matmul recipe {options.matmul!r} is not available yet")
    return with_lora(recipe, options)


def with_lora(recipe, options: ModelOptions):
    """``recipe`` wrapped for ``LoraWeight`` kernels (``layers/lora.py``) when ``options`` has LoRA."""
    if options.lora is None:
        return recipe
    return LoraRecipe(recipe, MatmulRecipe(options.compute_dtype, platform=options.target_platform()))


class LogitsRecipe(MatmulRecipe):
    """The output head's dot: inputs in the compute dtype, fp32 output (logits are always fp32). With a 16-bit
    compute dtype the backward pass runs as the default recipe's does: the logits' cotangent is cast to the compute
    dtype, and both transposed dots output it, so the head's weight gradient (a whole ``[D, vocab]`` partial sum
    on every device before the data-parallel reduction) is 16-bit, not an fp32 copy of the vocabulary matrix."""

    def __init__(self, dtype, platform: Optional[str] = None):
        super().__init__(dtype, jnp.float32, platform=platform)

    def dot_general(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: DimensionNumbers) -> jax.Array:
        if self.dtype.itemsize >= 4:
            return super().dot_general(lhs, rhs, dimension_numbers)
        return _logits_dot(lhs, rhs, dimension_numbers, self.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _logits_dot(lhs, rhs, dimension_numbers, dtype):
    return jax.lax.dot_general(lhs.astype(dtype), rhs.astype(dtype), dimension_numbers,
                               preferred_element_type=jnp.float32)


def _logits_dot_fwd(lhs, rhs, dimension_numbers, dtype):
    return _logits_dot(lhs, rhs, dimension_numbers, dtype), (lhs, rhs)


def _logits_dot_bwd(dimension_numbers, dtype, res, g):
    lhs, rhs = res
    a, b, g = lhs.astype(dtype), rhs.astype(dtype), g.astype(dtype)
    dot = partial(jax.lax.dot_general, dimension_numbers=dimension_numbers, preferred_element_type=dtype)
    (da,) = jax.linear_transpose(lambda x: dot(x, b), a)(g)
    (db,) = jax.linear_transpose(lambda y: dot(a, y), b)(g)
    return da.astype(lhs.dtype), db.astype(rhs.dtype)


_logits_dot.defvjp(_logits_dot_fwd, _logits_dot_bwd)


class Linear(nn.Module):
    """``y = x @ kernel (+ bias)`` over the last ``n_in`` dims of x; kernel ``[*in_dims, *features]``.

    ``axes`` names every kernel dim for sharding; with ``options.lora`` naming this layer, the kernel gets LoRA
    adapters (``layers/lora.py``); ``use_bias`` adds a ``bias [*features]`` (Qwen2's q/k/v),
    named like the kernel's output dims and added after the matmul recipe, in its output dtype. ``high_precision``
    routes around the matmul recipe to ``LogitsRecipe`` (the output head: logits are always fp32).
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    options: ModelOptions
    n_in: int = 1
    init_std: float = 0.02
    high_precision: bool = False
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_shape = tuple(x.shape[x.ndim - self.n_in:]) + tuple(self.features)
        assert len(self.axes) == len(kernel_shape), (self.name, self.axes, kernel_shape)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
            kernel_shape,
            self.options.params_dtype,
        )
        lora = self.options.lora
        if lora is not None and lora.applies(module_path(self)):
            kernel = lora_kernel(self, kernel, "", lora, self.axes, self.n_in)
        recipe = (with_lora(LogitsRecipe(self.options.compute_dtype, self.options.target_platform()), self.options)
                  if self.high_precision else matmul_recipe(self.options))
        y = recipe.linear(x, kernel, self.n_in, self.axes)
        if not self.use_bias:
            return y
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.n_in:]),
            tuple(self.features),
            self.options.params_dtype,
        )
        return y + bias.astype(y.dtype)
