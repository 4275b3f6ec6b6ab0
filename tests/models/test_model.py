"""deepseek_jax.models.transformer: causality, scan vs a plain loop, remat, jit, dispatch modes, packing, bf16, stats."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.layers.attention.layout import attention_layout
from deepseek_jax.layers.rope import rope_cos_sin

CONFIG = dsj.presets["tiny-v3"]
DENSE = CONFIG.replace(first_k_dense_replace=CONFIG.num_hidden_layers)


def _init(config=CONFIG, options=dsj.ModelOptions(), seed=0):
    model = dsj.Transformer(config, options)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), tokens)["params"])
    # Non-trivial norm scales and biases, so that each parameter matters.
    rng = np.random.RandomState(seed)

    def perturb(path, x):
        name = path[-1].key
        if name == "scale":
            return x * jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        if name == "e_score_correction_bias":
            return jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype)
        return x

    return model, jax.tree_util.tree_map_with_path(perturb, params)


def _tokens(b=2, t=12, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CONFIG.vocab_size, (b, t)))


@pytest.fixture(scope="module")
def model_params():
    return _init()


def test_causal(model_params):
    model, params = model_params
    tokens = _tokens()
    apply = jax.jit(model.apply)
    base = apply({"params": params}, tokens)
    changed = apply({"params": params}, tokens.at[:, 7:].set((tokens[:, 7:] + 1) % CONFIG.vocab_size))
    np.testing.assert_array_equal(np.asarray(base[:, :7]), np.asarray(changed[:, :7]))
    assert np.abs(np.asarray(base[:, 7:] - changed[:, 7:])).max() > 1e-3

    # Gradients of an early position's logits do not reach later embeddings.
    emb = params["embed_tokens"]["embedding"]

    def early_logit_sum(e):
        p = {**params, "embed_tokens": {"embedding": e}}
        return model.apply({"params": p}, tokens)[:, :5].sum()

    g = jax.jit(jax.grad(early_logit_sum))(emb)
    later_only = set(np.asarray(tokens[:, 5:]).ravel()) - set(np.asarray(tokens[:, :5]).ravel())
    assert later_only and all(float(jnp.abs(g[t]).max()) == 0.0 for t in later_only)


def test_scan_equals_a_plain_loop_over_blocks(model_params):
    """The scanned stacks against each layer applied one by one with its slice of the stacked params."""
    model, params = model_params
    tokens = _tokens()
    expected = model.apply({"params": params}, tokens)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos, sin = rope_cos_sin(positions, CONFIG)
    seg = jnp.ones((b, t), jnp.int32)
    h = params["embed_tokens"]["embedding"][tokens]
    for name, _, length in CONFIG.layer_runs:
        block = dsj.Block(CONFIG, dsj.ModelOptions(), moe=name.startswith("moe"))
        for i in range(length):
            layer = jax.tree.map(lambda x: x[i], params[name])
            h, _ = block.apply({"params": layer}, h, None, cos, sin, attention_layout(seg), seg)
    from deepseek_jax.layers.norm import rms_norm
    h = rms_norm(h, params["norm"]["scale"], CONFIG.rms_norm_eps)
    logits = h @ params["lm_head"]["kernel"]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)

    unrolled = dsj.Transformer(CONFIG, dsj.ModelOptions(scan_unroll=CONFIG.num_hidden_layers))
    np.testing.assert_allclose(np.asarray(unrolled.apply({"params": params}, tokens)), np.asarray(expected), atol=1e-5)


def _loss_and_grads(options, params, tokens):
    model = dsj.Transformer(CONFIG, options)

    def loss(p):
        logits, aux = model.apply({"params": p}, tokens, return_mtp=True)
        lp = jax.nn.log_softmax(logits[:, :-1])
        ce = -jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()
        mlp_ = jax.nn.log_softmax(aux["mtp_logits"][0][:, :-1])
        return ce - jnp.take_along_axis(mlp_, tokens[:, 2:, None], -1).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def baseline_grads(model_params):
    return _loss_and_grads(dsj.ModelOptions(), model_params[1], _tokens(t=10))


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_equals_no_remat(model_params, baseline_grads, policy):
    _, params = model_params
    l0, g0 = baseline_grads
    l1, g1 = _loss_and_grads(dsj.ModelOptions(remat=policy), params, _tokens(t=10))
    assert float(l0) == pytest.approx(float(l1), abs=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_jit_equals_no_jit(model_params):
    model, params = model_params
    tokens = _tokens()
    eager = model.apply({"params": params}, tokens)
    jitted = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, tokens)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)


def test_moe_dispatch_modes_agree(model_params, baseline_grads):
    """Blocked (sorted, sparse), ragged_dot, per-row weight gathers (small-batch decode) and every expert on every
    token give the same output."""
    _, params = model_params
    tokens = _tokens(t=10)
    options = {
        "dense": dsj.ModelOptions(moe_dispatch="dense"),
        "ragged": dsj.ModelOptions(moe_dispatch="ragged"),
        "blocked": dsj.ModelOptions(moe_dispatch="blocked", moe_block_size=4),  # several blocks per expert
        "gather": dsj.ModelOptions(moe_dispatch="gather"),
    }
    outs = {k: np.asarray(jax.jit(dsj.Transformer(CONFIG, o).apply)({"params": params}, tokens))
            for k, o in options.items()}
    for mode in ("blocked", "ragged", "gather"):
        np.testing.assert_allclose(outs[mode], outs["dense"], atol=2e-5, err_msg=mode)
    # The grads agree too (the blocked scan's per-block weight gathers transpose correctly); the baseline
    # (default options) runs the blocked dispatch with the automatic block size.
    _, g_dense = _loss_and_grads(options["dense"], params, tokens)
    for a, b in zip(jax.tree.leaves(g_dense), jax.tree.leaves(baseline_grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def _routed_rows(n, d, i, e, k):
    """Random routed-expert inputs: x ``[n, d]``, weights and ``k`` distinct expert ids of ``e`` per row, and the
    expert stacks ``[e, d, i]`` / ``[e, i, d]``."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
    wg, wu = (jnp.asarray(rng.normal(size=(e, d, i)), jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.normal(size=(e, i, d)), jnp.float32)
    return x, w, idx, wg, wu, wd


def test_blocked_dispatch_work_is_bounded():
    """Rows computed by the blocked dispatch: at most N*K + E*(block-1), independent of E*N."""
    from deepseek_jax.layers.linear import MatmulRecipe
    from deepseek_jax.moe.dispatch import dispatch_local

    def dispatch_blocked(recipe, *args, block_size):
        return dispatch_local(recipe, *args, impl="blocked", block_size=block_size)

    n, d, i, e, k, m = 40, 8, 4, 32, 2, 4
    x, w, idx, wg, wu, wd = _routed_rows(n, d, i, e, k)
    jaxpr = jax.make_jaxpr(lambda *a: dispatch_blocked(MatmulRecipe(jnp.float32), *a, block_size=m))(
        x, w, idx, wg, wu, wd)
    scans = [eq for eq in jaxpr.eqns if eq.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == (n * k + e * (m - 1)) // m
    # Reference: each token through its own experts.
    ref = np.zeros((n, d))
    for t in range(n):
        for j in range(k):
            ex = int(idx[t, j])
            h = jax.nn.silu(x[t] @ wg[ex]) * (x[t] @ wu[ex])
            ref[t] += float(w[t, j]) * np.asarray(h @ wd[ex])
    got = dispatch_blocked(MatmulRecipe(jnp.float32), x, w, idx, wg, wu, wd, block_size=m)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 3])
def test_blocked_dispatch_backward_keeps_no_per_block_weights(layers):
    """The gradient of the blocked dispatch holds no per-block copy of expert weights: no ``[blocks, D, I]`` stack
    of the blocks' slices (on a TPU compile of V3 those were 8.4 GB each) and no ``[blocks, E, D, I]`` stack of
    whole expert stacks (what a ``cond`` around the slicing kept: the gradient of the 88M bench model cost 24x its
    forward); and no block's ``cond`` returns a whole stack (its gradient: one ``[E, D, I]`` add per block). The
    backward slices each block's weights again and adds its ``[D, I]`` gradients in place. ``layers``: the dispatch
    inside a scan over layers, as the model runs it (its per-layer residuals are stacked there)."""
    import re

    from deepseek_jax.layers.linear import MatmulRecipe
    from deepseek_jax.moe.dispatch import dispatch_local

    n, d, i, e, k, m = 64, 48, 80, 4, 2, 8
    n_blocks = (n * k + e * (m - 1)) // m
    x, w, idx, wg, wu, wd = _routed_rows(n, d, i, e, k)
    ws = [jnp.stack([a * (1 + 0.1 * j) for j in range(layers)]) for a in (wg, wu, wd)]

    def loss(x, w, idx, wg, wu, wd):
        def layer(h, lw):
            return h + dispatch_local(MatmulRecipe(jnp.float32), h, w, idx, *lw, impl="blocked", block_size=m), None

        return jax.lax.scan(layer, x, (wg, wu, wd))[0].sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 3, 4, 5))).lower(x, w, idx, *ws).compile().as_text()
    stacks = re.findall(rf"\[(?:{layers},)?{n_blocks},(?:{e},)?(?:{d},{i}|{i},{d})\]", hlo)
    assert not stacks, f"per-block weight stacks in the backward: {stacks}"
    whole = [c for c in re.findall(r"= \(([^)]*)\) conditional\(", hlo) if re.search(rf"\[{e},({d},{i}|{i},{d})\]", c)]
    assert not whole, f"a block's cond returns whole expert stacks: {whole}"


@pytest.mark.parametrize("impl", ["ragged", "blocked", "gather", "dense"])
def test_grouped_gemm_row_scale(impl):
    """``row_scale`` (the expert-parallel MoE's routing weights, applied inside the grouped GEMM): each sorted
    row's result times its scale, in values and in gradients wrt x, the expert stacks and the scales."""
    from deepseek_jax.layers.linear import MatmulRecipe
    from deepseek_jax.moe.grouped import grouped_swiglu

    n, d, i, e = 24, 8, 6, 4
    x, _, _, wg, wu, wd = _routed_rows(n, d, i, e, 1)
    rng = np.random.RandomState(1)
    order = jnp.asarray(rng.permutation(n + 4)[:n + 2] % (n + 1), jnp.int32)  # repeats; n = padding
    sizes = jnp.asarray([7, 0, 9, 5], jnp.int32)  # 21 of 26 positions in groups, the rest padding
    scale = jnp.asarray(rng.uniform(0.1, 1.0, size=order.shape), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(order.shape[0], d)), jnp.float32)
    recipe = MatmulRecipe(jnp.float32)

    def scaled(x, wg, wu, wd, s):
        return grouped_swiglu(recipe, x, order, sizes, wg, wu, wd, impl, 4, row_scale=s)

    def by_hand(x, wg, wu, wd, s):
        return grouped_swiglu(recipe, x, order, sizes, wg, wu, wd, "dense") * s[:, None]

    args = (x, wg, wu, wd, scale)
    np.testing.assert_allclose(scaled(*args), by_hand(*args), rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda *a: (scaled(*a) * cot).sum(), argnums=range(5))(*args)
    g2 = jax.grad(lambda *a: (by_hand(*a) * cot).sum(), argnums=range(5))(*args)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_packed_documents_equal_separate_runs(model_params):
    model, params = model_params
    a, b = _tokens(b=1, t=5, seed=1), _tokens(b=1, t=7, seed=2)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    segments = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 3])
    positions = jnp.asarray([list(range(5)) + list(range(7)) + [0] * 3])
    out = model.apply({"params": params}, packed, positions, segments)
    np.testing.assert_allclose(np.asarray(out[:, :5]), np.asarray(model.apply({"params": params}, a)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[:, 5:12]), np.asarray(model.apply({"params": params}, b)), atol=1e-5)


def test_packed_documents_mtp_equal_separate_runs(model_params):
    """MTP rows pair position i's hidden state with token i+1: the row straddling two packed documents must
    belong to neither, so document B's MTP logits and loss are those of B alone."""
    from deepseek_jax.training import losses

    model, params = model_params
    a, b = _tokens(b=1, t=5, seed=1), _tokens(b=1, t=7, seed=2)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    segments = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 3])
    positions = jnp.asarray([list(range(5)) + list(range(7)) + [0] * 3])
    _, aux = model.apply({"params": params}, packed, positions, segments, return_mtp=True)
    mtp = np.asarray(aux["mtp_logits"][0])  # row i predicts token i + 2
    alone = {}
    for name, doc in (("a", a), ("b", b)):
        alone[name] = np.asarray(model.apply({"params": params}, doc, return_mtp=True)[1]["mtp_logits"][0])
    np.testing.assert_allclose(mtp[:, :4], alone["a"], atol=1e-5)
    np.testing.assert_allclose(mtp[:, 5:11], alone["b"], atol=1e-5)
    # The loss: packed targets (next tokens, boundary and padding masked) against the sum of separate runs.
    targets = jnp.concatenate([packed[:, 1:], jnp.zeros((1, 1), jnp.int32)], axis=1)
    mask = ((segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)).astype(jnp.float32)
    mask = jnp.concatenate([mask, jnp.zeros((1, 1))], axis=1)
    packed_loss = losses.mtp_loss([jnp.asarray(mtp)], targets, mask, segments, 1.0)
    sums = []
    for doc in (a, b):
        t = doc.shape[1]
        logits = jnp.asarray(alone["a" if t == 5 else "b"])
        tgt = jnp.concatenate([doc[:, 1:], jnp.zeros((1, 1), jnp.int32)], axis=1)
        m = jnp.concatenate([jnp.ones((1, t - 1)), jnp.zeros((1, 1))], axis=1)
        tk, mk = losses.mtp_targets(tgt, m, jnp.ones((1, t), jnp.int32), 1)
        sums.append(losses.cross_entropy(logits, tk, mk))
    expected = sum(float(s) for s, _ in sums) / sum(float(n) for _, n in sums)
    assert float(packed_loss) == pytest.approx(expected, rel=1e-5)


def test_router_stats_and_routing_intermediates(model_params):
    model, params = model_params
    tokens = _tokens(b=2, t=9)
    segments = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3])
    (_, aux), state = model.apply({"params": params}, tokens, None, segments, return_router_stats=True,
                                  mutable=["intermediates"])
    stats = aux["router_stats"]
    n_moe = CONFIG.num_hidden_layers - CONFIG.first_k_dense_replace
    assert stats["counts"].shape == (n_moe, 2, CONFIG.n_routed_experts)
    k = CONFIG.num_experts_per_tok
    np.testing.assert_allclose(np.asarray(stats["counts"].sum(-1)), [[9 * k, 6 * k]] * n_moe)
    np.testing.assert_allclose(np.asarray(stats["scores"].sum(-1)), [[9, 6]] * n_moe, rtol=1e-5)
    routing = state["intermediates"]["moe_layers"]["mlp"]["gate"]["routing"][0]
    experts = np.asarray(routing["experts"]).reshape(n_moe, 2, 9, k)
    for layer in range(n_moe):
        for seq, length in ((0, 9), (1, 6)):
            counts = np.bincount(experts[layer, seq, :length].ravel(), minlength=CONFIG.n_routed_experts)
            np.testing.assert_array_equal(counts, np.asarray(stats["counts"][layer, seq]))


def test_bf16_compute_close_to_fp32(model_params):
    """bf16 activations and matmul inputs (fp32 params) against fp32.

    Stated bounds: without routing (all layers dense) max |diff| < 2% of max |logit|; with MoE layers, where
    bf16 rounding flips some near-tied expert choices, relative RMS error < 5%.
    """
    bf16 = dsj.ModelOptions(dtype="bfloat16")
    tokens = _tokens(b=2, t=16)

    def rel_errors(model, params, config):
        f32 = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
        low = jax.jit(dsj.Transformer(config, bf16).apply)({"params": params}, tokens)
        assert low.dtype == jnp.float32  # logits are always fp32
        d = np.asarray(low) - f32
        return np.abs(d).max() / np.abs(f32).max(), np.sqrt((d**2).mean() / (f32**2).mean())

    max_err, _ = rel_errors(*_init(DENSE), DENSE)
    assert max_err < 0.02, max_err
    _, rms_err = rel_errors(*model_params, CONFIG)
    assert rms_err < 0.05, rms_err


def test_param_dtype():
    model = dsj.Transformer(CONFIG, dsj.ModelOptions(param_dtype="bfloat16", dtype="bfloat16"))
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))))
    params = params["params"]
    dtypes = {p[-1].key: x.dtype for p, x in jax.tree_util.tree_leaves_with_path(params)}
    assert dtypes["kernel"] == jnp.bfloat16 and dtypes["e_score_correction_bias"] == jnp.float32


def test_correction_bias_gets_no_gradient(baseline_grads):
    _, grads = baseline_grads
    assert float(jnp.abs(grads["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"]).max()) == 0.0
    assert float(jnp.abs(grads["moe_layers"]["mlp"]["gate"]["kernel"]).max()) > 0.0


def test_mtp_shares_one_head_matmul(model_params):
    """With MTP the output head is one matmul over the main and every depth's hidden states (under FSDP: one
    gather of the vocabulary matrix, one partial sum of its gradient), and each depth's logits equal the head
    applied to that depth alone."""
    model, params = model_params
    tokens = _tokens()
    d, v = CONFIG.hidden_size, CONFIG.vocab_size

    def head_dots(jaxpr):  # dot_generals against the [D, vocab] head, nested jaxprs included
        n = 0
        for eqn in jaxpr.eqns:
            rhs = eqn.invars[1].aval.shape if eqn.primitive.name == "dot_general" else None
            n += tuple(rhs or ()) == (d, v)
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", p)
                n += head_dots(inner) if hasattr(inner, "eqns") else 0
        return n

    fn = lambda p: model.apply({"params": p}, tokens, return_mtp=True)  # noqa: E731
    assert head_dots(jax.make_jaxpr(fn)(params).jaxpr) == 1
    logits, aux = fn(params)
    h = model.apply({"params": params}, tokens, return_hidden=True)[1]["hidden"]
    alone = jnp.einsum("btd,dv->btv", h, params["lm_head"]["kernel"], precision="highest")
    np.testing.assert_allclose(logits, alone, atol=1e-5, rtol=1e-5)
    depths = range(1, CONFIG.num_nextn_predict_layers + 1)
    assert [m.shape for m in aux["mtp_logits"]] == [(2, 12 - k, v) for k in depths]


@pytest.mark.parametrize("remat,keep", [("full", True), ("none", True), ("full", False)])
def test_expert_exchange_keeps_received_rows_outside_remat(model_params, monkeypatch, remat, keep):
    """Under a mesh, with ``moe_keep_received``, the routed experts keep an exchange's received rows for the
    backward pass only in layers that are not rematerialized (the MTP block, or every layer without remat): a
    rematerialized layer's recomputation would run the exchange anyway. Off by default."""
    import deepseek_jax.moe.layer as moe_mod
    from deepseek_jax.parallel.rules import LOGICAL_RULES

    _, params = model_params
    seen, real = [], moe_mod.expert_parallel_dispatch

    def spy(*args, keep_received, **kw):
        seen.append(keep_received)
        return real(*args, keep_received=keep_received, **kw)

    monkeypatch.setattr(moe_mod, "expert_parallel_dispatch", spy)
    model = dsj.Transformer(CONFIG, dsj.ModelOptions(remat=remat, moe_keep_received=keep))
    tokens = _tokens()
    # Traced (not run) for an 8-device expert mesh: this process may have one device.
    mesh = jax.sharding.AbstractMesh((8,), ("expert",))
    with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        jax.make_jaxpr(jax.grad(lambda p: model.apply({"params": p}, tokens, return_mtp=True)[0].sum()))(params)
    depths = CONFIG.num_nextn_predict_layers  # the MTP blocks trace last, after the main stack (maybe twice)
    assert len(seen) > depths and seen[-depths:] == [keep] * depths
    assert set(seen[:-depths]) == {keep and remat == "none"}
