"""DeepSeek Sparse Attention's parts (``layers/indexer.py``, ``layers/attention/sparse.py``): the lightning indexer
against transformers' ``DeepseekV32Indexer``, the blockwise running top-k against a dense top-k with packed
documents and padding, sparse latent attention (forward and gradients) against a dense masked reference, and the
indexer's KL loss against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.layers.attention.layout import attention_layout, visible
from deepseek_jax.layers.attention.sparse import (
    index_scores,
    indexer_kl_loss,
    indexer_topk,
    sparse_latent_attention,
)
from deepseek_jax.layers.indexer import Indexer
from deepseek_jax.layers.rope import rope_cos_sin

D, L, HI, DI, P, T = 64, 32, 8, 16, 8, 12


def _packed_layout(b, t):
    """Row 0 one document; row 1 two documents then padding."""
    seg = np.ones((b, t), np.int32)
    seg[1, 5:] = 2
    seg[1, t - 2:] = 0
    return attention_layout(jnp.asarray(seg))


def test_indexer_selects_what_transformers_selects():
    """Same weights, same inputs: for every query the top-k key set equals transformers' (whose top-k over fewer
    than k visible keys also returns masked ones: there, ours are exactly the visible keys)."""
    torch = pytest.importorskip("torch")
    from transformers import DeepseekV32Config
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer, DeepseekV32RotaryEmbedding

    topk = 5
    hf_config = DeepseekV32Config(hidden_size=D, q_lora_rank=L, qk_rope_head_dim=P, index_n_heads=HI,
                                  index_head_dim=DI, index_topk=topk, num_attention_heads=4, num_key_value_heads=4,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    hf = DeepseekV32Indexer(hf_config, 0).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    rng = np.random.RandomState(0)
    x, q_lat = rng.normal(size=(2, T, D)).astype(np.float32), rng.normal(size=(2, T, L)).astype(np.float32)
    pos = np.tile(np.arange(T), (2, 1))
    cos, sin = DeepseekV32RotaryEmbedding(hf_config)(torch.tensor(x), torch.tensor(pos))
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None].expand(2, T, T)
    want = hf(torch.tensor(x), torch.tensor(q_lat), (cos, sin), causal, torch.tensor(pos)).numpy()

    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = {"wq_b": {"kernel": sd["wq_b.weight"].T.reshape(L, HI, DI)}, "wk": {"kernel": sd["wk.weight"].T},
              "k_norm_scale": sd["k_norm.weight"], "k_norm_bias": sd["k_norm.bias"],
              "weights_proj": sd["weights_proj.weight"].T}
    config = dsj.ModelConfig(qk_rope_head_dim=P, rope_scaling=None, rope_theta=10000.0)
    our_cos, our_sin = rope_cos_sin(jnp.asarray(pos), config)
    q, k, w = Indexer(HI, DI, P, dsj.ModelOptions()).apply({"params": params}, jnp.asarray(x), jnp.asarray(q_lat),
                                                              our_cos, our_sin)
    idx, valid = indexer_topk(q, k, w, attention_layout(jnp.ones((2, T), jnp.int32)), topk, DI ** -0.5,
                              q_block=5, k_block=4)
    idx, valid = np.asarray(idx), np.asarray(valid)
    for b in range(2):
        for t in range(T):
            ours = set(idx[b, t][valid[b, t]].tolist())
            if t + 1 >= topk:
                assert ours == set(want[b, t].tolist()), (b, t)
            else:
                assert ours == set(range(t + 1)) <= set(want[b, t].tolist()), (b, t)


def test_blockwise_topk_equals_dense_topk_with_packed_documents():
    """Blocks that divide nothing (5 queries, 3 keys), packed documents and padding: each query's kept set is the
    top-k of its visible dense scores, or all of them when fewer are visible; padding queries keep nothing."""
    rng = np.random.RandomState(1)
    q = jnp.asarray(rng.normal(size=(2, T, HI, DI)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, T, DI)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, T, HI)), jnp.float32)
    layout = _packed_layout(2, T)
    for topk in (3, 7, 40):
        idx, valid = indexer_topk(q, k, w, layout, topk, 0.25, q_block=5, k_block=3)
        assert idx.shape == (2, T, min(topk, T))
        dense = np.where(np.asarray(visible(layout)), np.asarray(index_scores(q, k, w, 0.25)), -np.inf)
        for b in range(2):
            for t in range(T):
                seen = np.flatnonzero(np.isfinite(dense[b, t]))
                best = seen[np.argsort(-dense[b, t, seen], kind="stable")][:topk]
                assert set(np.asarray(idx)[b, t][np.asarray(valid)[b, t]].tolist()) == set(best.tolist()), (topk, b, t)
        # The keys in parts laid end to end (decoding: the cache, then the new tokens), read in place in blocks
        # that end where each part ends: the same choice, slot for slot.
        cut = 11
        parts = indexer_topk(q, (k[:, :cut], k[:, cut:]), w, layout, topk, 0.25, q_block=5, k_block=4)
        np.testing.assert_array_equal(np.asarray(parts[0]), np.asarray(idx))
        np.testing.assert_array_equal(np.asarray(parts[1]), np.asarray(valid))
    # the score itself: sum_j w_j relu(scale q_j . k)
    want = np.einsum("bth,bths->bts", np.asarray(w),
                     np.maximum(0.25 * np.einsum("bthd,bsd->bths", np.asarray(q), np.asarray(k)), 0))
    np.testing.assert_allclose(np.asarray(index_scores(q, k, w, 0.25)), want, rtol=1e-5, atol=1e-5)


def _dense_latent_reference(q, kv, layout, idx, valid, scale, rank):
    """softmax over the keys that are visible and selected, of q . kv; the average of kv's first ``rank`` dims."""
    b, t, h, _ = q.shape
    s = kv.shape[1]
    chosen = jnp.zeros((b, t, s), bool).at[jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None], idx].max(
        valid)
    mask = (visible(layout) & chosen)[:, :, None, :]
    sc = jnp.einsum("bthe,bse->bths", q, kv, precision=jax.lax.Precision.HIGHEST) * scale
    p = jnp.where(mask, jax.nn.softmax(jnp.where(mask, sc, -1e30), -1), 0.0)
    return jnp.einsum("bths,bsr->bthr", p, kv[..., :rank], precision=jax.lax.Precision.HIGHEST)


def test_sparse_latent_attention_and_its_gradients_equal_a_dense_masked_reference():
    rng = np.random.RandomState(2)
    h, r, topk, scale = 4, 12, 4, 0.3
    q = jnp.asarray(rng.normal(size=(2, T, h, r + P)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(2, T, r + P)), jnp.float32)
    layout = _packed_layout(2, T)
    sel_q = jnp.asarray(rng.normal(size=(2, T, HI, DI)), jnp.float32)
    sel_k = jnp.asarray(rng.normal(size=(2, T, DI)), jnp.float32)
    sel_w = jnp.asarray(rng.normal(size=(2, T, HI)), jnp.float32)
    idx, valid = indexer_topk(sel_q, sel_k, sel_w, layout, topk, 0.25, q_block=4, k_block=8)

    def ours(q, kv):
        return sparse_latent_attention(q, kv, idx, valid, scale, r, q_block=5)

    def ref(q, kv):
        return _dense_latent_reference(q, kv, layout, idx, valid, scale, r)

    np.testing.assert_allclose(np.asarray(ours(q, kv)), np.asarray(ref(q, kv)), atol=1e-5)
    # The rows in parts, each a (c_kv, k_pe) pair (the cache then the new tokens, never concatenated): the same.
    cut = 9
    split = ((kv[:, :cut, :r], kv[:, :cut, r:]), (kv[:, cut:, :r], kv[:, cut:, r:]))
    np.testing.assert_allclose(np.asarray(sparse_latent_attention(q, split, idx, valid, scale, r, q_block=5)),
                               np.asarray(ours(q, kv)), atol=1e-6)
    probe = jnp.asarray(rng.normal(size=(2, T, h, r)), jnp.float32)
    g_ours = jax.grad(lambda a, b: (ours(a, b) * probe).sum(), argnums=(0, 1))(q, kv)
    g_ref = jax.grad(lambda a, b: (ref(a, b) * probe).sum(), argnums=(0, 1))(q, kv)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # With every visible key selected it is plain (dense) causal latent attention.
    full_idx, full_valid = indexer_topk(sel_q, sel_k, sel_w, layout, T, 0.25)
    dense = _dense_latent_reference(q, kv, layout, jnp.broadcast_to(jnp.arange(T), (2, T, T)),
                                    jnp.ones((2, T, T), bool), scale, r)
    np.testing.assert_allclose(np.asarray(sparse_latent_attention(q, kv, full_idx, full_valid, scale, r)),
                               np.asarray(dense), atol=1e-5)


def test_indexer_kl_loss_equals_numpy_by_hand():
    """Two queries over three keys: target attention [0.2, 0.6, 0.0] (renormalized over the mask) and indexer
    logits [1, 2, 5] with the third key masked out; a query with no key contributes 0."""
    logits = jnp.asarray([[[1.0, 2.0, 5.0], [0.0, 0.0, 0.0]]])
    probs = jnp.asarray([[[0.2, 0.6, 0.7], [0.3, 0.3, 0.3]]])
    mask = jnp.asarray([[[True, True, False], [False, False, False]]])
    p = np.array([0.25, 0.75])
    q = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    want = float((p * np.log(p / q)).sum())
    assert float(indexer_kl_loss(logits, probs, mask)) == pytest.approx(want, rel=1e-4)  # fp32: ~1e-3 of cancelling terms
    g = jax.grad(lambda z: indexer_kl_loss(z, probs, mask))(logits)
    np.testing.assert_allclose(np.asarray(g)[0, 0], [q[0] - p[0], q[1] - p[1], 0.0], atol=1e-6)
    assert not np.asarray(g)[0, 1].any()
