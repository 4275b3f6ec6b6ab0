"""LoRA adapters inside the matmuls: ``LoraWeight`` and the recipe that multiplies by it.

A targeted kernel (``config/options.py``'s ``LoraOptions``) enters its matmul as ``LoraWeight(base, a, b, scale)``,
a pytree in the kernel's place: ``base`` is the frozen kernel as stored (an array, or an FP8-kept ``Fp8Weight`` /
``Fp4Weight``: QLoRA), ``a [lead, *in, r]`` and ``b [lead, r, *out]`` the adapters (``lead``: the expert dim of a
routed-expert stack). ``LoraRecipe`` wraps the layer's matmul recipe: for a ``LoraWeight`` it runs the recipe's own
matmul on the base, FP8 kernels and the grouped GEMMs' ``ragged_dot`` included, and adds
``scale * (x @ a) @ b`` in the compute dtype, never forming ``a @ b``; so the adapters' gradients cost two thin
matmuls and the base gets none. Indexing the lead dims (an expert by id, as the grouped GEMMs do) gives the
``LoraWeight`` of those entries; any other read (``astype``, other indexing) gives the merged kernel
``base + scale * a @ b``, which is what ``merge`` writes for export.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.config.options import LoraOptions


@jax.tree_util.register_pytree_node_class
class LoraWeight:
    """``base + scale * a @ b`` over the kernel's ``n_in`` input dims (see the module docstring). ``key``: when
    set, the adapters read their input through dropout at rate ``dropout`` (``dropped``); the base never does."""

    def __init__(self, base, a, b, scale: float, n_in: int = 1, key=None, dropout: float = 0.0):
        self.base, self.a, self.b, self.scale, self.n_in = base, a, b, float(scale), int(n_in)
        self.key, self.dropout = key, float(dropout)

    def tree_flatten(self):
        return (self.base, self.a, self.b, self.key), (self.scale, self.n_in, self.dropout)

    @classmethod
    def tree_unflatten(cls, aux, children):
        scale, n_in, dropout = aux
        return cls(*children[:3], scale, n_in, children[3], dropout)

    def dropped(self, x: jax.Array) -> jax.Array:
        """The adapters' input: ``x``, or with a ``key``, each element zeroed with probability ``dropout`` and the
        rest scaled by ``1 / (1 - dropout)`` (inverted dropout, as PEFT's ``lora_dropout``)."""
        if self.key is None or not self.dropout:
            return x
        keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)

    def with_key(self, key) -> "LoraWeight":
        return LoraWeight(self.base, self.a, self.b, self.scale, self.n_in, key, self.dropout)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def lead(self) -> int:
        return self.a.ndim - self.n_in - 1

    def delta(self, dtype=jnp.float32) -> jax.Array:
        """``scale * a @ b`` in the kernel's layout."""
        lead, r = self.a.shape[:self.lead], self.a.shape[-1]
        a2 = self.a.astype(jnp.float32).reshape(lead + (-1, r))
        b2 = self.b.astype(jnp.float32).reshape(lead + (r, -1))
        return (jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * self.scale).reshape(self.shape).astype(dtype)

    def astype(self, dtype) -> jax.Array:
        """The merged kernel, summed in fp32."""
        return (self.base.astype(jnp.float32) + self.delta()).astype(dtype)

    def __getitem__(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if self.lead and len(parts) <= self.lead and not any(p is Ellipsis or p is None for p in parts):
            return LoraWeight(self.base[index], self.a[index], self.b[index], self.scale, self.n_in, self.key,
                              self.dropout)
        return self.astype(jnp.float32)[index]

    def __repr__(self) -> str:
        return f"LoraWeight(shape={self.shape}, rank={self.a.shape[-1]}, scale={self.scale})"


def adapter_params(module: nn.Module, name: str, lora: LoraOptions, shape: tuple, axes: tuple, n_in: int,
                   lead: int = 0) -> tuple[jax.Array, jax.Array]:
    """Create ``{name}lora_a [*lead, *in, r]`` and ``{name}lora_b [*lead, r, *out]`` in ``module`` for a kernel of
    ``shape`` / logical ``axes`` (``lead`` stacked dims, then ``n_in`` input dims): fp32, sharded like the kernel's
    dims they share (the rank dim is replicated); A uniform in +-1/sqrt(fan_in) (PEFT's default), B zeros."""
    r = lora.rank
    split = lead + n_in
    init_a = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(lead, split)),
                                              out_axis=-1, batch_axis=tuple(range(lead)))
    a = module.param(f"{name}lora_a", nn.with_logical_partitioning(init_a, tuple(axes[:split]) + (None,)),
                     tuple(shape[:split]) + (r,), jnp.float32)
    b = module.param(f"{name}lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   tuple(axes[:lead]) + (None,) + tuple(axes[split:])),
                     tuple(shape[:lead]) + (r,) + tuple(shape[split:]), jnp.float32)
    return a, b


DROPOUT_RNG = "lora_dropout"  # the rng collection adapter dropout draws from (the trainer gives it per step)


def lora_kernel(module: nn.Module, kernel, name: str, lora: LoraOptions, axes: tuple, n_in: int,
                lead: int = 0) -> LoraWeight:
    """``kernel`` (``lead`` stacked dims, then ``n_in`` input dims, named ``axes``) as a ``LoraWeight`` with its
    adapters (``adapter_params``); with ``lora.dropout`` and a ``lora_dropout`` rng in the call (training), a key
    of this module's own for the adapters' dropout."""
    a, b = adapter_params(module, name, lora, tuple(kernel.shape), axes, n_in, lead)
    key = module.make_rng(DROPOUT_RNG) if lora.dropout and module.has_rng(DROPOUT_RNG) else None
    return LoraWeight(kernel, a, b, lora.scale, n_in, key, lora.dropout)


def per_device_dropout(w, mesh, axes) -> object:
    """Inside ``shard_map`` over ``mesh``: ``w`` (a ``LoraWeight`` with a dropout key) with the device's index
    along ``axes`` (those that split the input's rows) folded into its key, so that devices holding different rows
    draw different masks (and devices holding the same rows, the same ones); anything else as it is."""
    if not isinstance(w, LoraWeight) or w.key is None:
        return w
    index = 0
    for axis in axes:
        index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
    return w.with_key(jax.random.fold_in(w.key, index))


def module_path(module: nn.Module) -> str:
    """A module's '/'-joined path in the params tree (``moe_layers/self_attn/q_b_proj``)."""
    return "/".join(str(p) for p in module.scope.path)


def _kernel_form(w: LoraWeight, dims) -> bool:
    """``dims`` reads ``w`` as ``x @ kernel``: w's lead dims are the batch dims, then its input dims are contracted."""
    (lc, rc), (lb, rb) = (tuple(map(tuple, d)) for d in dims)
    nb = len(rb)
    return (rb == tuple(range(nb)) and nb == w.lead and rc == tuple(range(nb, nb + w.n_in))
            and len(lc) == w.n_in)


class LoraRecipe:
    """A matmul recipe (``inner``) that also multiplies by ``LoraWeight``s (see the module docstring); everything
    else goes to ``inner``, whose attributes it shows. ``adapter``: the recipe of the adapters' two thin matmuls
    (the default recipe in the compute dtype, also under the fp8 recipe: their rank-sized dims tile no FP8 block)."""

    def __init__(self, inner, adapter):
        self.inner, self.adapter = inner, adapter

    def __getattr__(self, name):  # only for names not found on the wrapper itself
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _plus(self, y, w: LoraWeight, x, dims) -> jax.Array:
        nb = w.lead
        xa = self.adapter.dot_general(w.dropped(x), w.a, dims)  # [batch, x's free dims, r]
        second = (((xa.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
        delta = self.adapter.dot_general(xa, w.b, second)
        return (y.astype(jnp.float32) + w.scale * delta.astype(jnp.float32)).astype(y.dtype)

    def linear(self, x, kernel, n_in: int, axes=None):
        if not isinstance(kernel, LoraWeight):
            return self.inner.linear(x, kernel, n_in, axes)
        y = self.inner.linear(x, kernel.base, n_in, axes)
        return self._plus(y, kernel, x, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))

    def dot_general(self, lhs, rhs, dimension_numbers):
        if not isinstance(rhs, LoraWeight):
            return self.inner.dot_general(lhs, rhs, dimension_numbers)
        if not _kernel_form(rhs, dimension_numbers):  # e.g. every expert on every row: the merged stack
            return self.inner.dot_general(lhs, rhs.astype(jnp.float32), dimension_numbers)
        return self._plus(self.inner.dot_general(lhs, rhs.base, dimension_numbers), rhs, lhs, dimension_numbers)

    def ragged_dot(self, lhs, rhs, group_sizes):
        if not isinstance(rhs, LoraWeight):
            return self.inner.ragged_dot(lhs, rhs, group_sizes)
        y = self.inner.ragged_dot(lhs, rhs.base, group_sizes)
        delta = self.adapter.ragged_dot(self.adapter.ragged_dot(rhs.dropped(lhs), rhs.a, group_sizes), rhs.b,
                                        group_sizes)
        return (y.astype(jnp.float32) + rhs.scale * delta.astype(jnp.float32)).astype(y.dtype)


def lora_specs(w, spec, make_base_spec=None):
    """In-specs (``shard_map``) for ``w`` whose plain kernel takes ``spec``: for a ``LoraWeight``, A takes the spec's
    lead and input entries (its rank dim none), B the lead and output entries; ``make_base_spec(base, spec)`` gives
    the base's (an FP8-kept stack's)."""
    base = w.base if isinstance(w, LoraWeight) else w
    base_spec = spec if make_base_spec is None else make_base_spec(base, spec)
    if not isinstance(w, LoraWeight):
        return base_spec
    entries = tuple(spec) + (None,) * (w.ndim - len(tuple(spec)))
    split = w.lead + w.n_in
    return LoraWeight(base_spec, P(*entries[:split], None), P(*entries[:w.lead], None, *entries[split:]),
                      w.scale, w.n_in, None if w.key is None else P(), w.dropout)


def merge(params, scale: float):
    """``params`` with every adapter pair folded into its kernel (``kernel + scale * a @ b``, summed in fp32, stored
    in the kernel's dtype; an FP8-kept kernel becomes fp32) and the adapters dropped: a plain params tree, e.g. for
    export or generation. Nothing else changes, bit for bit."""
    def one(kernel, a, b):
        merged = LoraWeight(kernel, a, b, scale, _n_in(kernel, a, b)).astype(jnp.float32)
        return merged if hasattr(kernel, "scale") else merged.astype(kernel.dtype)

    return fold_adapters(params, one)


def fold_adapters(tree, fn):
    """``tree`` (nested dicts: params, or a checkpoint's lazy tensors) with each adapted kernel replaced by
    ``fn(kernel, lora_a, lora_b)`` and the adapters dropped (a Linear's ``kernel`` has ``lora_a`` / ``lora_b``
    beside it, an expert stack ``gate_proj`` has ``gate_proj_lora_a`` / ``gate_proj_lora_b``)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        if is_adapter_path(k):
            continue
        prefix = adapter_prefix(k)
        if not isinstance(v, dict) and f"{prefix}lora_a" in tree:
            out[k] = fn(v, tree[f"{prefix}lora_a"], tree[f"{prefix}lora_b"])
        else:
            out[k] = fold_adapters(v, fn)
    return out


def _n_in(kernel, a, b) -> int:
    """The input dims of ``kernel`` given its adapters: ``a [*lead, *in, r]``, ``b [*lead, r, *out]`` and
    ``kernel [*lead, *in, *out]`` give ``a.ndim + b.ndim - 2 = kernel.ndim + lead``."""
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    return a.ndim - 1 - lead


def adapter_prefix(leaf: str) -> str:
    """What the adapters of kernel leaf ``leaf`` are named with, before ``lora_a`` / ``lora_b``: a Linear's
    ``kernel`` has ``lora_a`` beside it, an expert stack ``gate_proj`` has ``gate_proj_lora_a``."""
    return "" if leaf == "kernel" else leaf + "_"


def is_adapter_path(path: str) -> bool:
    """A parameter path (``param_path``) of an adapter."""
    return path.endswith(("lora_a", "lora_b"))


def without_adapters(tree):
    """A params-shaped tree (nested dicts) with the adapter leaves removed."""
    if not isinstance(tree, dict):
        return tree
    return {k: without_adapters(v) for k, v in tree.items() if not is_adapter_path(k)}


def adapters_only(tree):
    """A params-shaped tree with only its adapter leaves (empty branches dropped)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = adapters_only(v)
            if sub:
                out[k] = sub
        elif is_adapter_path(k):
            out[k] = v
    return out


def combine(tree, base):
    """Two params trees (nested dicts) in one: ``tree``'s entries, with those it lacks or holds as None taken
    from ``base``."""
    if isinstance(tree, dict) and isinstance(base, dict):
        return {k: combine(tree.get(k), base.get(k)) for k in {**base, **tree}}
    return base if tree is None else tree
