"""DeepSeek-V3.2 (DSA) against transformers' ``DeepseekV32ForCausalLM`` in float32: a tiny config whose
``index_topk`` is smaller than the context, so the indexer's choice decides the logits."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import hf_model, torch_logits

import deepseek_jax as dsj

TOL = 1e-4
V32 = dsj.presets["tiny-v3"].replace(model_type="deepseek_v32", index_topk=4, index_head_dim=16, index_n_heads=8,
                                     num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    ref = hf_model(V32, seed=3, bias_scale=0.3)
    path = tmp_path_factory.mktemp("v32")
    ref.save_pretrained(path, max_shard_size="100KB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, params = dsj.load_pretrained(path)
    return ref, config, params


def test_logits_match_transformers_where_sparsity_bites(converted):
    ref, config, params = converted
    assert config == V32, "config.json round trip"
    tokens = np.random.RandomState(0).randint(0, V32.vocab_size, (3, 11))
    expected = torch_logits(ref, tokens)
    got = np.asarray(dsj.Transformer(config).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(got - expected).max() <= TOL
    # The indexer matters: with every key selected (V3's dense attention on the same weights) the logits move.
    dense = np.asarray(dsj.Transformer(config.replace(index_topk=11)).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(dense - expected).max() > 100 * TOL


def test_packed_documents_equal_each_document_alone(converted):
    """Two documents packed in one row (segment ids, per-document positions) and padding: each document's logits
    equal transformers' on that document alone; the indexer never picks a key of the other document."""
    ref, config, params = converted
    rng = np.random.RandomState(1)
    a, b = rng.randint(0, V32.vocab_size, 7), rng.randint(0, V32.vocab_size, 6)
    tokens = np.concatenate([a, b, [0, 0]])[None]
    segments = np.asarray([[1] * 7 + [2] * 6 + [0, 0]])
    positions = np.asarray([list(range(7)) + list(range(6)) + [0, 0]])
    got = np.asarray(dsj.Transformer(config).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                                                   jnp.asarray(segments)))
    np.testing.assert_allclose(got[0, :7], torch_logits(ref, a[None])[0], atol=TOL)
    np.testing.assert_allclose(got[0, 7:13], torch_logits(ref, b[None])[0], atol=TOL)


def test_the_main_loss_gives_the_indexer_no_gradient(converted):
    """The main loss has no gradient into the indexer (top-k is not differentiable: the reference detaches it);
    the attention weights get one (its own KL is what trains it: test_indexer_stages_train_what_they_should)."""
    _, config, params = converted
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, V32.vocab_size, (2, 11)))

    def loss(p):
        logits = dsj.Transformer(config).apply({"params": p}, tokens)
        return jax.nn.log_softmax(logits).mean()

    grads = jax.grad(loss)(params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in
            jax.tree_util.tree_leaves_with_path(grads)}
    indexer = {k: float(jnp.abs(v).max()) for k, v in flat.items() if "/indexer/" in k}
    assert indexer and all(v == 0 for v in indexer.values()), indexer
    assert float(jnp.abs(flat["dense_layers/self_attn/kv_b_proj/kernel"]).max()) > 0


def test_the_preset_counts_what_transformers_counts():
    """``deepseek-v3.2``'s main model from shapes alone equals transformers' ``DeepseekV32ForCausalLM`` with its
    default config on the meta device: 671,877,929,216 parameters plus the 58 MoE layers' correction biases (256
    each), which transformers keeps as buffers and the checkpoint as tensors."""
    import torch
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from deepseek_jax.models.counts import param_counts

    with torch.device("meta"):
        hf = DeepseekV32ForCausalLM(DeepseekV32Config())
    params = sum(p.numel() for p in hf.parameters())
    biases = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert (params, biases) == (671_877_929_216, 58 * 256)
    counts = param_counts(dsj.presets["deepseek-v3.2"])
    assert counts["main"] == params + biases
    assert counts["mtp_0"] > 0  # the MTP module, with its own indexer


def test_hf_orbax_hf_round_trip_is_bit_exact_and_transformers_loads_it(converted, tmp_path):
    """HF -> ``convert`` (Orbax, fp32) -> ``export``: every tensor, the indexer's included, bit for bit; the
    export's config.json names ``DeepseekV32ForCausalLM`` and transformers loads it with the same logits."""
    import torch
    from convert_fixtures import read_all
    from transformers import AutoModelForCausalLM

    from deepseek_jax.checkpoint.convert.convert import convert
    from deepseek_jax.checkpoint.convert.export import export

    ref, _, _ = converted
    src, orbax, out = str(tmp_path / "hf"), str(tmp_path / "orbax"), str(tmp_path / "out")
    ref.save_pretrained(src)
    convert(src, orbax, dtype="float32", progress=False)
    export(orbax, out, progress=False)
    a, b = read_all(src), read_all(out)
    assert set(a) == set(b) and any(".indexer.wq_b." in k for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == "DeepseekV32ForCausalLM"
    tokens = np.random.RandomState(3).randint(0, V32.vocab_size, (2, 9))
    np.testing.assert_allclose(torch_logits(back, tokens), torch_logits(ref, tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefill_chunk", [None, 4])
def test_decode_equals_the_full_forward(converted, prefill_chunk):
    """Greedy generation over the latent cache plus the indexer's key cache, prompts longer than ``index_topk``
    (so the cached steps select too), whole or in chunks of 4 (each chunk attends to the cache so far): every
    generated token is the full forward's argmax, and its log-probability equals the full forward's (1e-4)."""
    from deepseek_jax.inference.generation import generate
    from deepseek_jax.layers import kv_cache

    _, config, params = converted
    rng = np.random.RandomState(4)
    prompts = [rng.randint(0, V32.vocab_size, n).tolist() for n in (9, 6, 12)]
    res = generate(config, params, prompts, max_new_tokens=8, eos_token_id=None, prefill_chunk=prefill_chunk)
    forward = jax.jit(lambda p, t: dsj.Transformer(config).apply({"params": p}, t))
    for prompt, tokens, logps in zip(prompts, res.tokens, res.logprobs):
        logits = np.asarray(forward(params, jnp.asarray([prompt + tokens[:-1]])))[0, len(prompt) - 1:]
        assert tokens == logits.argmax(-1).tolist()
        full = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))[np.arange(len(tokens)), tokens]
        np.testing.assert_allclose(logps, full, atol=1e-4)
    # The cache holds the indexer's keys beside the latent: 576 + 128 values per token and layer in the preset,
    # and `deepseek-jax info` says so.
    from deepseek_jax.tools.info import describe

    assert kv_cache.cache_bytes_per_token(dsj.presets["deepseek-v3.2"], "bfloat16") == (576 + 128) * 61 * 2
    assert "576 + 128 (indexer key) values x 61 layers = 42,944 values (85,888 bytes in bf16)" in describe(
        dsj.presets["deepseek-v3.2"])


def test_sparse_stage_kl_is_the_selected_sets_kl_from_dense_quantities(converted):
    """One V3.2 attention layer with ``indexer_loss="sparse"``: the sown KL equals ``KL(p || softmax(I))`` over
    each query's selected keys, with p the dense attention's probabilities (visible and selected keys, summed over
    heads, L1-normalized) and I the dense index scores, both gathered at the selection."""
    from deepseek_jax.layers.attention.layout import attention_layout, visible
    from deepseek_jax.layers.attention.sparse import index_scores, indexer_kl_loss, indexer_topk
    from deepseek_jax.layers.mla import MLA
    from deepseek_jax.layers.rope import rope_cos_sin

    _, config, params = converted
    layer = jax.tree.map(lambda a: a[0], params["dense_layers"]["self_attn"])
    # Sharper index scores than the random init's (which are nearly flat): a KL far from 0.
    layer["indexer"] = {**layer["indexer"], "weights_proj": layer["indexer"]["weights_proj"] * 100}
    rng = np.random.RandomState(5)
    x = jnp.asarray(rng.normal(size=(2, 11, config.hidden_size)), jnp.float32)
    cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(11), (2, 11)), config)
    seg = jnp.asarray([[1] * 11, [1] * 6 + [2] * 4 + [0]])
    layout = attention_layout(seg)
    mla = MLA(config, dsj.ModelOptions(indexer_loss="sparse"))
    _, sown = mla.apply({"params": layer}, x, cos, sin, layout, method=MLA.prefill, mutable=["indexer_kl"])
    got = float(jax.tree.leaves(sown)[0])

    def parts(m):
        q_nope, q_pe, q_lat = m.query(x, cos, sin, with_latent=True)
        c_kv, k_pe = m.latent(x, cos, sin)
        w = m.variables["params"]["kv_b_proj"]["kernel"]
        q = jnp.concatenate([jnp.einsum("bthn,rhn->bthr", q_nope, w[..., :config.qk_nope_head_dim]), q_pe], -1)
        return q, jnp.concatenate([c_kv, k_pe], -1), m.indexer(x, q_lat, cos, sin)

    q, kv, (qi, ki, wi) = MLA(config, dsj.ModelOptions()).apply({"params": layer}, method=parts)
    idx, valid = indexer_topk(qi, ki, wi, layout, config.index_topk, config.index_head_dim ** -0.5)
    chosen = np.zeros((2, 11, 11), bool)
    b_i, t_i, k_i = np.nonzero(np.asarray(valid))  # (a query with fewer than k keys has filler slots: skip them)
    chosen[b_i, t_i, np.asarray(idx)[b_i, t_i, k_i]] = True
    mask = np.asarray(visible(layout)) & chosen
    scores = np.einsum("bthe,bse->bhts", np.asarray(q), np.asarray(kv)) * config.softmax_scale
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = np.nan_to_num(probs / probs.sum(-1, keepdims=True)).sum(1)  # [B, T, S], summed over heads
    dense_i = np.asarray(index_scores(qi, ki, wi, config.index_head_dim ** -0.5))
    take = lambda a: np.take_along_axis(a, np.asarray(idx), -1)  # noqa: E731
    want = float(indexer_kl_loss(jnp.asarray(take(dense_i)), jnp.asarray(take(probs)), valid))
    assert got == pytest.approx(want, rel=1e-4) and got > 0.1


def test_indexer_stages_train_what_they_should():
    """The dense warm-up trains the indexer alone (every other weight bit-identical) and lowers its KL to the
    attention; the sparse stage trains everything, the indexer through its KL only (weight 0: unchanged)."""
    from deepseek_jax.parallel.mesh import make_mesh
    from deepseek_jax.training.config import TrainConfig
    from deepseek_jax.training.trainer import Trainer

    config = V32.replace(num_hidden_layers=2, vocab_size=64)
    rng = np.random.RandomState(6)
    toks = rng.randint(3, 64, (4, 17))
    batch = {"inputs": toks[:, :-1].astype(np.int32), "targets": toks[:, 1:].astype(np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)), "segment_ids": np.ones((4, 16), np.int32),
             "loss_mask": np.ones((4, 16), np.float32)}

    def run(stage, steps, weight=1.0):
        tc = TrainConfig(batch_size=4, seq_len=16, learning_rate=1e-2, warmup_steps=1, weight_decay=0.0,
                         indexer_stage=stage, indexer_loss_weight=weight, mtp_weight=0.0)
        tr = Trainer(config, tc, make_mesh(None))
        state = tr.init_state()
        before = jax.tree.map(np.asarray, state["params"])
        kls = []
        for _ in range(steps):
            state, m = tr.run_step(state, tr.put_batch(batch))
            kls.append(float(m["indexer_kl"]))
        after = jax.tree.map(np.asarray, state["params"])
        flat = lambda t: {"/".join(str(getattr(k, "key", k)) for k in p): v  # noqa: E731
                          for p, v in jax.tree_util.tree_leaves_with_path(t)}
        moved = {k: not np.array_equal(v, flat(after)[k]) for k, v in flat(before).items()}
        return kls, moved

    kls, moved = run("warmup", 25)
    assert all(moved[k] for k in moved if "/indexer/" in k)
    assert not any(moved[k] for k in moved if "/indexer/" not in k)  # the balancing bias included
    assert kls[-1] < 0.7 * kls[0], kls
    _, moved = run("sparse", 2)
    assert all(moved[k] for k in moved if "/indexer/" in k)
    assert moved["dense_layers/self_attn/kv_b_proj/kernel"]
    _, moved = run("sparse", 2, weight=0.0)
    assert not any(moved[k] for k in moved if "/indexer/" in k)
    assert moved["dense_layers/self_attn/kv_b_proj/kernel"]
    with pytest.raises(ValueError, match="no lightning indexer"):
        Trainer(dsj.presets["tiny-v3"], TrainConfig(indexer_stage="warmup"), make_mesh(None))


SHARDED_SCRIPT = r"""
import json, jax, numpy as np, flax.linen as nn, jax.numpy as jnp
import deepseek_jax as dsj
import train_helpers as th
from deepseek_jax.parallel.mesh import make_mesh
th.CONFIG = th.CONFIG.replace(model_type="deepseek_v32", index_topk=6, index_head_dim=16, index_n_heads=4)
out = {"ref": th.run_steps(None, devices=jax.devices()[:1])[0]}
ref_params = th.run_steps(None, devices=jax.devices()[:1])[1]
for spec in ["data=2,fsdp=2,expert=2", "expert=8"]:
    losses, params, _ = th.run_steps(spec)
    out[spec] = {"losses": losses, "max_param_diff": max(float(np.abs(a - b).max()) for a, b in
                                                          zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))}
# Context parallelism (the indexer keys gathered with the latent): each stage against one device.
import dataclasses
for stage, spec in ((None, "data=2,context=4"), (None, "tensor=2,context=4"), ("sparse", "tensor=2,context=4"),
                    ("warmup", "data=2,context=4")):
    tc = dataclasses.replace(th.TRAIN, indexer_stage=stage)
    ref_s, ref_p, _ = th.run_steps(None, devices=jax.devices()[:1], tc=tc)
    losses, p, _ = th.run_steps(spec, tc=tc)
    out[f"{stage} {spec}"] = {"ref": ref_s, "losses": losses, "max_param_diff": max(
        float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)))}
params = jax.tree.map(jnp.asarray, ref_params)
from deepseek_jax.inference import steps as decode
from deepseek_jax.layers import kv_cache as kvcache
from deepseek_jax.models.transformer import Transformer
from deepseek_jax.parallel.mesh import mesh_context
from deepseek_jax.parallel.rules import param_shardings
tokens = jnp.asarray(np.random.RandomState(0).randint(3, th.CONFIG.vocab_size, (2, 32)), jnp.int32)
lengths = jnp.asarray([32, 27], jnp.int32)
def run_prefill(mesh):
    cache, p = kvcache.init_cache(th.CONFIG, 2, 64, mtp=True), params
    if mesh is not None:
        boxed = jax.eval_shape(Transformer(th.CONFIG).init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
        p = jax.device_put(params, param_shardings(boxed["params"], mesh))
        cache = jax.device_put(cache, kvcache.cache_shardings(cache, mesh))
    with mesh_context(mesh):
        cache, logits, _ = decode.prefill(p, cache, tokens, lengths, config=th.CONFIG, options=dsj.ModelOptions(),
                                          mtp=True)
    return np.asarray(logits), [np.asarray(x) for x in jax.tree.leaves(cache)]
ref_logits, ref_cache = run_prefill(None)
logits, cache = run_prefill(make_mesh("data=2,context=4"))
out["prefill"] = {"logits": float(np.abs(logits - ref_logits).max()), "leaves": len(cache),
                  "cache": max(float(np.abs(a - b).max()) for a, b in zip(cache, ref_cache))}
prompts = [np.random.RandomState(i).randint(3, th.CONFIG.vocab_size, n).tolist() for i, n in enumerate((9, 12, 7, 10))]
out["generate"] = {name: [list(map(int, t)) for t in dsj.generate(th.CONFIG, params, prompts, max_new_tokens=6,
                                                                  eos_token_id=None, mesh=mesh).tokens]
                   for name, mesh in (("one", None), ("sharded", make_mesh("data=2,fsdp=2,expert=2")))}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_train_steps_and_generation_on_expert_parallel_and_context_parallel_meshes_equal_one_device():
    """V3.2 (top-6 of 16 keys) on 8 simulated devices: two train steps with the expert-parallel MoE give one
    device's losses and params (measured 1.8e-6 apart), and sharded greedy generation the same tokens. Under
    context parallelism (the indexer keys gathered with the latent, heads split over ``tensor`` too), the plain,
    sparse-stage and warm-up steps give one device's (measured 1.5e-6, 5.8e-6, 9.5e-7 apart), and a prefill the
    same logits and cache (the indexer's key cache included)."""
    import train_helpers as th

    out = th.run_on_8_devices(SHARDED_SCRIPT)
    for spec in ("data=2,fsdp=2,expert=2", "expert=8"):
        np.testing.assert_allclose(out[spec]["losses"], out["ref"], rtol=1e-5, err_msg=spec)
        assert out[spec]["max_param_diff"] < 1e-5, (spec, out[spec]["max_param_diff"])
    assert out["generate"]["sharded"] == out["generate"]["one"]
    for key in ("None data=2,context=4", "None tensor=2,context=4", "sparse tensor=2,context=4",
                "warmup data=2,context=4"):
        np.testing.assert_allclose(out[key]["losses"], out[key]["ref"], rtol=1e-5, err_msg=key)
        assert out[key]["max_param_diff"] < 2e-5, (key, out[key]["max_param_diff"])
    assert out["prefill"]["logits"] < 1e-4 and out["prefill"]["cache"] < 1e-5, out["prefill"]


def test_flops_count_the_selected_keys_and_the_indexer_over_every_visible_key():
    """MFU's FLOPs for V3.2: attention over min(index_topk, visible) keys per token, the indexer over every
    visible key (2 x Hi x Di per key and layer), by hand on a packed batch; a decode step at a 128k cache costs
    the attention of index_topk keys."""
    from deepseek_jax.models.counts import active_params, causal_selected, flops_per_token
    from deepseek_jax.parallel.mesh import make_mesh
    from deepseek_jax.training.config import TrainConfig
    from deepseek_jax.training.trainer import Trainer

    config = V32.replace(num_hidden_layers=2, vocab_size=64)
    seg = np.ones((2, 16), np.int32)
    seg[1, 10:] = 2
    seg[0, 13:] = 0
    pos = np.tile(np.arange(16, dtype=np.int32), (2, 1))
    pos[1, 10:] = np.arange(6)
    toks = np.random.RandomState(0).randint(3, 64, (2, 16)).astype(np.int32)
    batch = {"inputs": toks, "targets": toks, "positions": pos, "segment_ids": seg,
             "loss_mask": (seg > 0).astype(np.float32)}
    tr = Trainer(config, TrainConfig(batch_size=2, seq_len=16, mtp_weight=0.0), make_mesh(None))
    state = tr.init_state()
    _, m = tr.run_step(state, tr.put_batch(batch))
    docs = [13, 10, 6]
    visible = sum(n * (n + 1) // 2 for n in docs)
    selected = sum(min(t, 4) for n in docs for t in range(1, n + 1))  # index_topk = 4
    assert float(m["attended_keys"]) == visible and float(m["selected_keys"]) == selected
    per_key = 3 * 2 * 2 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    indexer = 2 * 2 * 8 * 16  # layers x index_n_heads x index_head_dim
    want = 6 * active_params(config, False) * 29 + per_key * selected + indexer * visible
    assert tr.step_flops(29.0, visible, selected) == pytest.approx(want, rel=1e-12)
    assert [causal_selected(n, 4) for n in (3, 13)] == pytest.approx(
        [np.mean([min(t, 4) for t in range(1, n + 1)]) for n in (3, 13)], rel=1e-12)
    big = dsj.presets["deepseek-v3.2"]
    v3 = big.replace(model_type="deepseek_v3")
    dense = flops_per_token(v3, 131072, train=False, mtp=False)
    sparse = flops_per_token(big, 131072, train=False, mtp=False)
    head = 2 * 61 * 128 * (192 + 128)
    weights = 2 * (active_params(big, False) - active_params(v3, False))  # the indexer's projections
    assert dense - sparse == pytest.approx(head * (131072 - 2048) - 2 * 61 * 64 * 128 * 131072 - weights,
                                           rel=1e-9)


def test_fp8_release_format_reads_and_exports_back(tmp_path):
    """A V3.2 FP8 release (the indexer's wq_b / wk in e4m3 with 128x128 scales, weights_proj bf16, the norms
    fp32; ue8m0 scales; edge blocks partial): converted logits equal transformers' on the dequantized weights,
    and ``export --fp8`` of the FP8-kept tree gives the release's tensors back. (transformers builds no V3.2 MTP
    layer; ours maps its indexer under the same names, checked on the map.)"""
    from convert_fixtures import FP8_CONFIG, TOKENS, make_fp8, read_all, v32_fp8_quantized

    from deepseek_jax.checkpoint.convert.convert import convert
    from deepseek_jax.checkpoint.convert.export import release_quantized
    from deepseek_jax.checkpoint.hf_map import hf_tensor_map
    from deepseek_jax.cli import main

    config = FP8_CONFIG.replace(model_type="deepseek_v32", index_topk=4, index_head_dim=32, index_n_heads=4)
    src = str(tmp_path / "fp8")
    ref, tensors = make_fp8(src, ue8m0=True, config=config, quantized=v32_fp8_quantized, mtp=False)
    assert tensors["model.layers.1.self_attn.indexer.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.self_attn.indexer.wk.weight_scale_inv"].shape == (1, 2)  # 32 x 192
    assert tensors["model.layers.1.self_attn.indexer.weights_proj.weight"].dtype == torch.bfloat16
    mtp_maps = {key: release_quantized(m.path, m.transpose)
                for m in hf_tensor_map(config.replace(num_nextn_predict_layers=1)) for key, _ in m.sources
                if key.startswith("model.layers.2.self_attn.indexer.")}
    assert mtp_maps == {"model.layers.2.self_attn.indexer." + k: q for k, q in (
        ("wq_b.weight", True), ("wk.weight", True), ("weights_proj.weight", False), ("k_norm.weight", False),
        ("k_norm.bias", False))}
    # The reference: our forward on transformers' dequantized weights (saved fp32): at these widths the indexer's
    # scores tie at 0 (ReLU) for some queries, and transformers' top-k breaks those ties otherwise, so its logits
    # differ there; the parity with transformers is tested above where no tie decides.
    ref.save_pretrained(tmp_path / "dequantized")
    conf, params = dsj.load_pretrained(str(tmp_path / "dequantized"))
    want = np.asarray(dsj.Transformer(conf).apply({"params": params}, jnp.asarray(TOKENS)))
    for keep in (False, True):
        dst = str(tmp_path / f"out{keep}")
        convert(src, dst, dtype="float32", keep_fp8=keep, progress=False)
        conf, params = dsj.load_pretrained(dst)
        got = np.asarray(dsj.Transformer(conf).apply({"params": params}, jnp.asarray(TOKENS)))
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    back = str(tmp_path / "back")
    assert main(["export", dst, back, "--fp8", "--no-progress"]) == 0
    got = read_all(back)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype, k
        same = got[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else got[k]
        assert torch.equal(same, v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v), k


def test_fp8_cache_keeps_the_indexer_keys_in_e4m3_with_one_scale_per_token(converted):
    """``cache_dtype="fp8"``: the indexer's keys are e4m3 with one fp32 scale per token (128 values in the real
    model, as DeepSeek stores them) beside the latent's; decoding every position over it stays close to the full
    forward (e4m3's 3 mantissa bits can move a near-tie in the top-k, so the bound is loose)."""
    from deepseek_jax.inference import steps as decode
    from deepseek_jax.layers import kv_cache

    _, config, params = converted
    cache = kv_cache.init_cache(config, 2, 16, "fp8")
    entry = cache["main"]["dense_layers"]
    assert entry["index_k"].dtype == jnp.float8_e4m3fn and entry["index_k"].shape[-1] == config.index_head_dim
    assert entry["index_k_scale"].shape == entry["index_k"].shape[:-1]
    assert kv_cache.cache_bytes_per_token(dsj.presets["deepseek-v3.2"], "fp8") == (576 + 128 + 3 * 4) * 61
    tokens = jnp.asarray(np.random.RandomState(5).randint(0, config.vocab_size, (2, 12)), jnp.int32)
    full = np.asarray(jax.jit(dsj.Transformer(config).apply)({"params": params}, tokens))
    cached = np.asarray(decode.decode_all_positions(params, tokens, config=config, cache_dtype="fp8",
                                                    prefill_len=3))
    err = (cached - full)[:, 3:]
    relative_rms = np.sqrt((err**2).mean() / (full[:, 3:] ** 2).mean())
    assert 1e-4 < relative_rms < 0.15, relative_rms
    assert (cached.argmax(-1) == full.argmax(-1)).mean() >= 0.75
