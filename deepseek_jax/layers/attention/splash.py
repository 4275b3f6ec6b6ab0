"""The Pallas TPU splash kernel for a row's causal self-attention with packed segments (forward and backward
kernels); off TPU it runs in Pallas' interpreter, for tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.layers.attention.blockwise import DEFAULT_BLOCK
from deepseek_jax.parallel.mesh import current_mesh
from deepseek_jax.parallel.rules import dividing_axes


def splash_attention(q, k, v, q_segment, k_segment, scale: float, block: int = DEFAULT_BLOCK,
                     interpret: bool = False) -> jax.Array:
    """A row's causal self-attention (query and key t at place t of the row, ``T == S``) with packed segments,
    by the Pallas TPU splash kernel (``jax.experimental.pallas.ops.tpu.splash_attention``, forward and backward
    kernels): the same values as ``naive_attention`` on that layout.

    q ``[B,T,H,Dk]``, k ``[B,T,Hk,Dk]`` (Hk = 1: the kernel's MQA form; grouped heads, 1 < Hk < H, are repeated to
    the H query heads), v ``[B,T,Hk,Dv]``; segments ``[B,T]``. The block is rounded up to a multiple of 128; the
    rows are padded to a multiple of it with segment 0, head dims to a multiple of 128 with zeros (which change no
    score). Splash lets segment 0 (padding) attend to itself; those rows are zeroed
    after, as the other cores give. Under a mesh the kernel runs per device (``jax.shard_map``) on its batch and
    head shards. ``interpret`` runs Pallas' interpreter (any backend; slow: for tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    b, t, h, dk = q.shape
    if 1 < k.shape[2] < h:
        k, v = (jnp.repeat(x, h // k.shape[2], axis=2) for x in (k, v))
    hk, dv = k.shape[2], v.shape[-1]
    if k.shape[1] != t:
        raise ValueError(f"splash attention is a row's self-attention: {t} queries but {k.shape[1]} keys")
    up = lambda n: -(-n // 128) * 128  # noqa: E731  (the kernel's blocks and head dims: multiples of 128 lanes)
    bq = min(up(block), up(t))
    pt = -t % bq
    q = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, pt), (0, 0), (0, up(dk) - dk)))
    k = jnp.pad(k, ((0, 0), (0, pt), (0, 0), (0, up(dk) - dk)))
    v = jnp.pad(v, ((0, 0), (0, pt), (0, 0), (0, up(dv) - dv)))
    q_seg = jnp.pad(q_segment, ((0, 0), (0, pt)))
    k_seg = jnp.pad(k_segment, ((0, 0), (0, pt)))
    n = t + pt
    sizes = sk.BlockSizes(block_q=bq, block_kv=bq, block_kv_compute=bq, block_q_dkv=bq, block_kv_dkv=bq,
                          block_kv_dkv_compute=bq, use_fused_bwd_kernel=True)

    def local(q, k, v, q_seg, k_seg):
        heads = q.shape[2]
        mask = sm.MultiHeadMask([sm.CausalMask((n, n)) for _ in range(heads)])
        make = sk.make_splash_mqa if hk == 1 else sk.make_splash_mha
        kernel = make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        kv = (lambda x: x[:, 0]) if hk == 1 else (lambda x: jnp.swapaxes(x, 0, 1))

        def row(q, k, v, qs, ks):  # q [T,H,D] -> [H,T,D]
            return kernel(jnp.swapaxes(q, 0, 1), kv(k), kv(v), segment_ids=sk.SegmentIds(qs, ks))

        return jnp.swapaxes(jax.vmap(row)(q, k, v, q_seg, k_seg), 1, 2)  # [B,T,H,Dv]

    mesh = current_mesh()
    if mesh is not None:
        bt = dividing_axes("act_batch", b, mesh) or None
        ht = (dividing_axes("heads", h, mesh) or None) if hk == h else None
        qs, kvs, ss = P(bt, None, ht, None), P(bt, None, ht if hk == h else None, None), P(bt, None)
        # check_vma off: a Pallas call cannot declare how its outputs vary (they vary as its inputs do).
        local = jax.shard_map(local, mesh=mesh, in_specs=(qs, kvs, kvs, ss, ss), out_specs=qs, check_vma=False)
    out = local(q, k, v, q_seg, k_seg)[:, :t, :, :dv]
    return jnp.where((q_segment > 0)[:, :, None, None], out, 0).astype(v.dtype)


