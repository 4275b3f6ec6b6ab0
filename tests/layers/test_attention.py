"""deepseek_jax.layers.attention: blockwise attention against the naive reference, in values and gradients; the model
with blockwise attention against the naive model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.layers.attention.blockwise import blockwise_attention
from deepseek_jax.layers.attention.layout import Layout, visible
from deepseek_jax.layers.attention.reference import naive_attention


def _case(b=3, t=37, s=None, h=4, hk=4, dk=24, dv=16, seed=0):
    """Packed segments, a padded tail, a row that is padding throughout, an odd length."""
    rng = np.random.RandomState(seed)
    s = t if s is None else s
    q = jnp.asarray(rng.normal(size=(b, t, h, dk)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, hk, dk)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, hk, dv)), jnp.float32)
    seg = np.ones((b, t), np.int32)
    seg[0, 20:] = 2  # two packed documents
    seg[1, 30:] = 0  # padding at the end...
    seg[1, :3] = 0  # ...and at the start
    seg[2, :] = 0  # a fully padded row
    idx = np.tile(np.arange(t), (b, 1))
    return q, k, v, Layout(jnp.asarray(idx), jnp.asarray(seg), jnp.asarray(idx), jnp.asarray(seg)), rng


@pytest.mark.parametrize("blocks", [(8, 16), (16, 8), (5, 7), (64, 64)])
def test_blockwise_equals_naive_in_values_and_gradients(blocks):
    q, k, v, lay, rng = _case()
    cot = jnp.asarray(rng.normal(size=(*q.shape[:3], v.shape[-1])), jnp.float32)
    scale = 0.2
    naive = lambda *a: naive_attention(*a, lay, scale)  # noqa: E731
    block = lambda *a: blockwise_attention(*a, lay, scale, *blocks)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(block)(q, k, v)), np.asarray(naive(q, k, v)), atol=1e-5)
    g_naive = jax.grad(lambda *a: (naive(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
    g_block = jax.jit(jax.grad(lambda *a: (block(*a) * cot).sum(), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_block, g_naive):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # The padded row outputs zeros and passes no gradient.
    out = np.asarray(jax.jit(block)(q, k, v))
    assert np.all(out[2] == 0) and np.all(out[1, :3] == 0)
    assert np.all(np.asarray(g_block[0])[2] == 0)


def test_shared_latent_head_and_cache_keys():
    """The absorbed decode's shape: one key/value head shared by every query head, queries at positions 20..27
    attending to 20 cached slots (the first 2 stale) then themselves."""
    from deepseek_jax.layers.attention.layout import cache_layout, cache_visibility

    rng = np.random.RandomState(1)
    b, t, s, h = 2, 8, 24, 4
    q = jnp.asarray(rng.normal(size=(b, t, h, 12)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s + t, 1, 12)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s + t, 1, 10)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(20, 28, dtype=jnp.int32), (b, t))
    lay = cache_layout(positions, s, first_slot=2)
    np.testing.assert_array_equal(np.asarray(visible(lay)), np.asarray(cache_visibility(positions, s, 2)))
    m = np.asarray(visible(lay))[0]
    assert not m[:, :2].any() and m[:, 2:20].all() and not m[:, 20:s].any()  # stale and unwritten slots unseen
    assert np.array_equal(m[:, s:], np.tril(np.ones((t, t), bool)))
    want = naive_attention(q, k, v, lay, 0.3)
    got = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, lay, 0.3, 4, 8))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def _loss_fn(config, options, tokens, segments):
    model = dsj.Transformer(config, options)

    def loss(p):
        logits, aux = model.apply({"params": p}, tokens, None, segments, return_mtp=True, return_hidden=True)
        logp = jax.nn.log_softmax(logits[:, :-1])
        ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
        mtp = sum(jax.nn.logsumexp(m).mean() for m in aux.get("mtp_logits", []))
        return ce + 0.1 * mtp, logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2"])
def test_model_with_blockwise_attention_equals_naive(preset):
    config = dsj.presets[preset]
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, config.vocab_size, (2, 21)))
    segments = jnp.asarray([[1] * 12 + [2] * 9, [1] * 17 + [0] * 4])
    params = nn.meta.unbox(jax.jit(dsj.Transformer(config).init)(jax.random.PRNGKey(0), tokens)["params"])
    runs = {}
    for name, options in (("naive", dsj.ModelOptions(attention="naive")),
                          ("blockwise", dsj.ModelOptions(attention="blockwise", attention_block=8))):
        (value, logits), grads = _loss_fn(config, options, tokens, segments)(params)
        runs[name] = (value, logits, grads)
    (v0, l0, g0), (v1, l1, g1) = runs["naive"], runs["blockwise"]
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), atol=1e-5)
    assert float(v1) == pytest.approx(float(v0), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_model_with_the_cudnn_path_equals_naive():
    """The model (V3's q/k head dim 2x the v head dim at tiny size) with attention="cudnn" (XLA's implementation
    here) on right-padded single-document rows: logits and gradients equal the naive model's."""
    config = dsj.presets["tiny-v3"]
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (2, 21)))
    segments = jnp.asarray([[1] * 21, [1] * 17 + [0] * 4])
    params = nn.meta.unbox(jax.jit(dsj.Transformer(config).init)(jax.random.PRNGKey(0), tokens)["params"])
    (v0, l0), g0 = _loss_fn(config, dsj.ModelOptions(attention="naive"), tokens, segments)(params)
    (v1, l1), g1 = _loss_fn(config, dsj.ModelOptions(attention="cudnn"), tokens, segments)(params)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), atol=1e-5)
    assert float(v1) == pytest.approx(float(v0), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_auto_picks_blockwise_past_one_block():
    """A long sequence never builds the [T, T] score matrix under the default options."""
    config = dsj.presets["tiny-v3"].replace(num_hidden_layers=1, first_k_dense_replace=1,
                                            num_nextn_predict_layers=0)
    model = dsj.Transformer(config)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    for t, blockwise in ((512, False), (2048, True)):
        jaxpr = str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(nn.meta.unbox(params),
                                                                              jnp.zeros((1, t), jnp.int32)))
        full_scores = f"f32[1,4,{t},{t}]"  # [B, H, T, S]
        assert (full_scores in jaxpr) is not blockwise, t


def test_model_gradient_memory_is_linear_in_length_with_blockwise_attention():
    """The model's layers run in a differentiated scan. Its partial evaluation once hoisted the layout's
    per-block masks out of the layer loop and kept them for every (query block, key block) pair, so the
    gradient held O(T^2) bytes even with blockwise attention. Compiled temporaries must now stay below one
    layer's fp32 score matrix ``[H, T, T]`` and grow about linearly with T."""
    config = dsj.presets["tiny-v3"].replace(num_hidden_layers=2, first_k_dense_replace=2, num_nextn_predict_layers=0)
    model = dsj.Transformer(config, dsj.ModelOptions(attention="blockwise", attention_block=128))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]

    def temp_bytes(t):
        loss = lambda p, x: model.apply({"params": p}, x).mean()  # noqa: E731
        lowered = jax.jit(jax.grad(loss)).lower(params, jax.ShapeDtypeStruct((1, t), jnp.int32))
        return lowered.compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(2048)
    scores = config.num_attention_heads * 2048 * 2048 * 4
    assert large < scores, (large, scores)
    assert large / small < 2.5, (small, large)


@pytest.mark.parametrize("hk", [2, 1])
def test_splash_kernel_equals_naive_in_values_and_gradients(hk):
    """The TPU splash kernel (run by Pallas' interpreter here) on a row's self-attention: packed documents,
    padding at both ends, a fully padded row, a length that is not a multiple of the block, head dims padded
    to 128."""
    from deepseek_jax.layers.attention.core import attention

    q, k, v, lay, rng = _case(t=150, hk=hk)
    cot = jnp.asarray(rng.normal(size=(*q.shape[:3], v.shape[-1])), jnp.float32)
    scale = 0.2
    splash = lambda *a: attention(*a, lay, scale, "splash", 128, "cpu", self_attention=True)  # noqa: E731
    naive = lambda *a: naive_attention(*a, lay, scale)  # noqa: E731
    np.testing.assert_allclose(np.asarray(splash(q, k, v)), np.asarray(naive(q, k, v)), atol=2e-5)
    g_splash = jax.grad(lambda *a: (splash(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
    g_naive = jax.grad(lambda *a: (naive(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_splash, g_naive):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_auto_picks_the_splash_kernel_on_tpu_for_self_attention_only():
    from deepseek_jax.layers.attention.core import attention

    q, k, v, lay, _ = _case(t=150)

    def kernels(**kw):
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, lay, 0.2, "auto", 64, **kw))(q, k, v))
        return jaxpr.count("pallas_call")

    assert kernels(platform="tpu", self_attention=True) > 0
    assert kernels(platform="tpu", self_attention=False) == 0  # cache keys: the blockwise core
    assert kernels(platform="cpu", self_attention=True) == 0
    with pytest.raises(ValueError, match="self-attention"):
        attention(q, k, v, lay, 0.2, "splash", 64, "cpu")


def _single_document_case(t=150, h=4, dk=24, dv=16, seed=1):
    """Right-padded rows of one document each (as prompts are prefilled), a fully padded row among them."""
    q, k, v, _, rng = _case(t=t, h=h, dk=dk, dv=dv, seed=seed)
    seg = np.zeros((3, t), np.int32)
    seg[0, :] = 1
    seg[1, :101] = 3
    idx = np.tile(np.arange(t), (3, 1))
    return q, k, v, Layout(jnp.asarray(idx), jnp.asarray(seg), jnp.asarray(idx), jnp.asarray(seg)), rng


def test_single_document_detects_packed_rows():
    from deepseek_jax.layers.attention.cudnn import single_document

    assert bool(single_document(_single_document_case()[3].q_segment))
    assert not bool(single_document(_case()[3].q_segment))  # packed, padding in front
    assert not bool(single_document(jnp.asarray([[1, 1, 0, 1]])))  # a document after padding
    assert not bool(single_document(jnp.asarray([[1, 2, 2, 0]])))


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_path_equals_naive_in_values_and_gradients(packed):
    """The GPU path (``jax.nn.dot_product_attention`` with per-row lengths, V padded from 16 to the q/k head dim
    24; XLA's implementation of it here, no GPU) on right-padded single-document rows, and its blockwise fallback
    on packed rows."""
    from deepseek_jax.layers.attention.core import attention

    q, k, v, lay, rng = (_case(t=150) if packed else _single_document_case())
    cot = jnp.asarray(rng.normal(size=(*q.shape[:3], v.shape[-1])), jnp.float32)
    fused = lambda *a: attention(*a, lay, 0.2, "cudnn", 64, "cpu", self_attention=True)  # noqa: E731
    naive = lambda *a: naive_attention(*a, lay, 0.2)  # noqa: E731
    out = fused(q, k, v)
    assert out.shape == (*q.shape[:3], v.shape[-1])
    np.testing.assert_allclose(np.asarray(out), np.asarray(naive(q, k, v)), atol=1e-5)
    g_fused = jax.grad(lambda *a: (fused(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
    g_naive = jax.grad(lambda *a: (naive(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_fused, g_naive):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_auto_picks_cudnn_on_gpu_in_16_bit_self_attention(monkeypatch):
    from deepseek_jax.layers.attention.core import attention

    q, k, v, lay, _ = _single_document_case()
    real, asked = jax.nn.dot_product_attention, []

    def spy(*args, implementation=None, **kw):  # no GPU here: record the request, run XLA's implementation
        asked.append(implementation)
        return real(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)

    def calls(q, k, v, **kw):
        asked.clear()
        jax.make_jaxpr(lambda q, k, v: attention(q, k, v, lay, 0.2, "auto", 64, **kw))(q, k, v)
        return list(asked)

    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    assert calls(*bf, platform="gpu", self_attention=True) == ["cudnn"]
    assert calls(*bf, platform="gpu", self_attention=False) == []  # cache keys: blockwise
    assert calls(q, k, v, platform="gpu", self_attention=True) == []  # fp32: cuDNN's kernel is 16-bit only
    assert calls(*bf, platform="cpu", self_attention=True) == []
    assert calls(*bf, platform="tpu", self_attention=True) == []  # splash
    with pytest.raises(ValueError, match="self-attention"):
        attention(q, k, v, lay, 0.2, "cudnn", 64, "cpu")


SPLASH_MESH_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
import deepseek_jax as dsj
from deepseek_jax.parallel.mesh import make_mesh, mesh_context
from deepseek_jax.parallel.rules import param_shardings
config = dsj.presets["tiny-v3"].replace(num_hidden_layers=2, num_nextn_predict_layers=0)
toks = jnp.asarray(np.random.RandomState(0).randint(3, 500, (4, 160)), jnp.int32)
seg = np.ones((4, 160), np.int32); seg[1, 100:] = 2; seg[2, 150:] = 0
ref_m = dsj.Transformer(config, dsj.ModelOptions(attention="naive"))
params = ref_m.init(jax.random.key(0), toks)["params"]
ref = ref_m.apply({"params": params}, toks, segment_ids=jnp.asarray(seg))
m = dsj.Transformer(config, dsj.ModelOptions(attention="splash", attention_block=128))
mesh = make_mesh("data=2,fsdp=2,tensor=2")
p = jax.device_put(params, param_shardings(jax.eval_shape(m.init, jax.random.key(0), toks)["params"], mesh))
with mesh_context(mesh):
    out = jax.jit(lambda p, t, s: m.apply({"params": p}, t, segment_ids=s))(p, toks, jnp.asarray(seg))
print("RESULT", float(np.abs(np.asarray(out) - np.asarray(ref))[seg > 0].max()))
"""


@pytest.mark.slow
def test_splash_kernel_under_a_mesh_equals_one_device():
    """Under a mesh the kernel runs per device on its batch and head shards (shard_map): the model's logits
    equal the naive model's on one device (8 simulated devices, heads split over tensor)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SPLASH_MESH_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = float([line for line in proc.stdout.splitlines() if line.startswith("RESULT")][-1].split()[1])
    assert diff < 1e-5, diff
