"""LoRA (layers/lora.py, TrainConfig.lora_rank, deepseek-jax train --lora-rank): adapters inside the dense and
grouped matmuls equal the merged weights; a LoRA run trains only the adapters, keeps optimizer state for them
only, and exports merged weights that transformers loads with our logits."""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from convert_fixtures import make_hf, read_all
from tiny_inference import word_tokenizer
from train_helpers import run_on_8_devices

import deepseek_jax as dsj
from deepseek_jax.cli import main
from deepseek_jax.config.options import LoraOptions, ModelOptions
from deepseek_jax.layers.lora import merge
from deepseek_jax.training.optimizer import param_path

# A dense first layer, then MoE layers: LoRA on the attention projections, the dense MLP and the routed experts.
CONFIG = dsj.presets["tiny-v3"].replace(num_nextn_predict_layers=0)
LORA = LoraOptions(rank=4, alpha=8.0, targets=("*self_attn/*proj*", "*mlp/experts/*_proj", "dense_layers/mlp/*"))
TOKENS = np.random.RandomState(0).randint(0, CONFIG.vocab_size, (2, 12)).astype(np.int32)


def _lora_params(options, seed=0):
    """Initialized params with random (non-zero) B adapters, so that every adapter changes the output."""
    params = nn.meta.unbox(dsj.Transformer(CONFIG, options).init(jax.random.PRNGKey(seed), TOKENS)["params"])
    key = jax.random.PRNGKey(seed + 1)

    def one(path, x):
        name = param_path(path)
        return 0.1 * jax.random.normal(jax.random.fold_in(key, hash(name) % 9973), x.shape) \
            if name.endswith("lora_b") else x

    return jax.tree_util.tree_map_with_path(one, params)


@pytest.mark.parametrize("impl", ["blocked", "gather", "ragged", "dense"])
def test_adapters_equal_the_merged_weights(impl):
    options = ModelOptions(lora=LORA, moe_dispatch=impl)
    params = _lora_params(options)
    paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    adapted = {p.rsplit("/", 1)[0] if p.endswith("/lora_a") else p[:-len("_lora_a")]
               for p in paths if p.endswith("lora_a")}
    assert {"dense_layers/mlp/gate_proj", "moe_layers/self_attn/q_b_proj", "moe_layers/self_attn/o_proj",
            "moe_layers/mlp/experts/down_proj"} <= adapted
    assert not any("shared_experts" in p or "lm_head" in p for p in adapted)
    ours = dsj.Transformer(CONFIG, options).apply({"params": params}, TOKENS)
    plain = dsj.Transformer(CONFIG, ModelOptions(moe_dispatch=impl))
    merged = plain.apply({"params": merge(params, LORA.scale)}, TOKENS)
    base = plain.apply({"params": merge(_zero_b(params), LORA.scale)}, TOKENS)
    assert float(jnp.abs(merged - base).max()) > 0.1  # the adapters matter
    np.testing.assert_allclose(np.asarray(ours), np.asarray(merged), rtol=1e-6, atol=1e-6)


def _zero_b(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if param_path(p).endswith("lora_b") else x, params)


def test_merge_changes_only_the_targeted_kernels():
    params = _lora_params(ModelOptions(lora=LORA))
    merged = merge(params, LORA.scale)
    flat = {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    for p, x in jax.tree_util.tree_leaves_with_path(merged):
        name = param_path(p)
        stem = name[:-len("/kernel")] if name.endswith("/kernel") else name
        if f"{stem}/lora_a" in flat or f"{stem}_lora_a" in flat:
            a = flat.get(f"{stem}/lora_a", flat.get(f"{stem}_lora_a"))
            b = flat.get(f"{stem}/lora_b", flat.get(f"{stem}_lora_b"))
            lead = a.ndim + b.ndim - 2 - x.ndim
            want = flat[name] + LORA.scale * np.matmul(a.reshape(a.shape[:lead] + (-1, a.shape[-1])),
                                                       b.reshape(b.shape[:lead + 1] + (-1,))).reshape(x.shape)
            np.testing.assert_allclose(np.asarray(x), want, rtol=1e-6, atol=1e-7)
            assert not np.array_equal(np.asarray(x), flat[name]), name
        else:
            assert np.array_equal(np.asarray(x), flat[name]), name  # bit-identical, the router's bias included
    assert not any("lora" in param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(merged))


EP_SCRIPT = r"""
import json
import jax, numpy as np
import deepseek_jax as dsj
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.trainer import Trainer
from deepseek_jax.training.optimizer import param_path
config = dsj.presets["tiny-v3"].replace(num_nextn_predict_layers=0)
tc = TrainConfig(batch_size=8, seq_len=16, lora_rank=4, lora_alpha=8.0, learning_rate=1e-2, warmup_steps=0,
                 moe_dispatch="blocked", lora_targets=("*self_attn/*proj*", "*mlp/experts/*_proj", "dense_layers/mlp/*"))
rng = np.random.default_rng(0)
x = rng.integers(1, config.vocab_size, (8, 17))
batch = dict(inputs=x[:, :-1], targets=x[:, 1:], positions=np.tile(np.arange(16), (8, 1)),
             segment_ids=np.ones((8, 16), np.int32), loss_mask=np.ones((8, 16), np.float32))
out = {}
for spec in (None, "fsdp=2,expert=4"):
    mesh = make_mesh(spec) if spec else make_mesh(None, jax.devices()[:1])
    trainer = Trainer(config, tc, mesh)
    state = trainer.init_state()
    losses = []
    for _ in range(3):
        state, m = trainer.run_step(state, trainer.put_batch(batch))
        losses.append(float(m["total_loss"]))
    base = {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(trainer.init_state()["params"])
            if "lora" not in param_path(p)}
    out["base_kept " + str(spec)] = all(np.array_equal(np.asarray(v), base[param_path(p)])
                                        for p, v in jax.tree_util.tree_leaves_with_path(state["params"])
                                        if "lora" not in param_path(p))
    out[str(spec)] = {"losses": losses, "adapters": {param_path(p): np.asarray(v).tolist()
                      for p, v in jax.tree_util.tree_leaves_with_path(state["params"])
                      if param_path(p).endswith("experts/down_proj_lora_b")}}
# adapter dropout under expert parallelism: B starts at zero, so the first step's loss is the plain one; after it,
# the dropped adapters' loss differs
import dataclasses
trainer = Trainer(config, dataclasses.replace(tc, lora_dropout=0.5), make_mesh("fsdp=2,expert=4"))
state = trainer.init_state()
out["dropout"] = []
for _ in range(2):
    state, m = trainer.run_step(state, trainer.put_batch(batch))
    out["dropout"].append(float(m["total_loss"]))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # two trainers on 8 simulated devices: ~1 min on 2 cores
def test_expert_parallel_lora_steps_equal_one_device():
    out = run_on_8_devices(EP_SCRIPT)
    one, ep = out["None"], out["fsdp=2,expert=4"]
    assert out["base_kept None"] and out["base_kept fsdp=2,expert=4"]  # the frozen base, bit for bit
    np.testing.assert_allclose(ep["losses"], one["losses"], rtol=1e-5)
    assert one["losses"][-1] < one["losses"][0]
    np.testing.assert_allclose(out["dropout"][0], ep["losses"][0], rtol=1e-6)
    assert abs(out["dropout"][1] - ep["losses"][1]) > 1e-4
    for name, value in one["adapters"].items():
        # Adam's normalized steps amplify the last bits of small gradients: 1e-5 of values ~0.03 after 3 steps
        np.testing.assert_allclose(ep["adapters"][name], value, rtol=1e-4, atol=1e-5)
        assert np.abs(value).max() > 0  # B moved from its zero init


# ----- end to end: transformers checkpoint -> LoRA SFT -> merged export -> transformers -------------------
STEPS = 12


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    src = str(root / "hf")
    make_hf(src, CONFIG, mtp=False)
    word_tokenizer(root / "hf")
    with open(root / "data.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(f"w{(i + j) % 50 + 10}" for j in range(12))}) + "\n")
    work = str(root / "run")
    rc = main(["train", "--init-from", src, "--data", str(root / "data.jsonl"), "--workdir", work,
               "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "16", "--lr", "2e-2", "--warmup", "0",
               "--save-every", str(STEPS), "--lora-rank", "4", "--lora-alpha", "8"])
    assert rc == 0
    out = str(root / "exported")
    assert main(["export", work, out, "--no-progress"]) == 0
    return {"src": src, "work": work, "out": out}


@pytest.mark.slow  # the fixture compiles a LoRA train step
def test_lora_run_trains_only_the_adapters(lora_run):
    import orbax.checkpoint as ocp

    with open(os.path.join(lora_run["work"], "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == STEPS and np.mean(losses[-3:]) < losses[0]
    # The checkpoint: the adapters (moved) and Adam's moments for them, no base; the run points at its base.
    mgr = ocp.CheckpointManager(os.path.join(lora_run["work"], "checkpoints"))
    state = mgr.restore(STEPS)["state"]
    mgr.close()
    adapters = {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}
    assert adapters and all(k.endswith(("lora_a", "lora_b")) for k in adapters)
    assert all(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("lora_b"))
    moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x))
    assert moments == 2 * sum(v.size for v in adapters.values())
    with open(os.path.join(lora_run["work"], "train_config.json")) as f:
        assert json.load(f)["lora_base"] == os.path.abspath(lora_run["src"])


@pytest.mark.slow  # the fixture compiles a LoRA train step
def test_merged_export_loads_in_transformers_with_our_logits(lora_run):
    from transformers import AutoModelForCausalLM

    src, out = read_all(lora_run["src"]), read_all(lora_run["out"])
    assert set(src) == set(out)
    changed = {k for k in src if not torch.equal(src[k], out[k])}
    # Exactly the targeted kernels: attention projections and routed experts (q_a, q_b, kv_a, kv_b, o; gate, up,
    # down of every expert); the router, its bias, norms, shared experts, embedding and head are bit-identical.
    assert changed and all("self_attn" in k and "norm" not in k or ".experts." in k for k in changed), changed
    assert any(".experts." in k for k in changed) and any("kv_b_proj" in k for k in changed)
    config, params = dsj.load_pretrained(lora_run["work"])  # the work dir reads back merged
    ours = np.asarray(dsj.Transformer(config).apply({"params": params}, TOKENS))
    model = AutoModelForCausalLM.from_pretrained(lora_run["out"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(lora_run["src"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert np.abs(base(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy() - ref).max() > 1e-3


def test_qlora_over_a_kept_fp8_base_equals_lora_over_the_dequantized_base():
    """QLoRA: the targeted kernels kept as FP8 (e4m3 + 128x128 block scales, as DeepSeek's releases store them),
    the adapters on top, against the same adapters over those kernels dequantized to fp32."""
    from deepseek_jax.layers.lora import _n_in
    from deepseek_jax.quant.weights import Fp8Weight, quantize

    options = ModelOptions(lora=LORA)
    params = _lora_params(options)

    def keep_fp8(tree):
        out = {}
        for k, v in tree.items():
            prefix = "" if k == "kernel" else k + "_"
            if isinstance(v, dict):
                out[k] = keep_fp8(v)
            elif f"{prefix}lora_a" in tree:
                n_in = _n_in(v, tree[f"{prefix}lora_a"], tree[f"{prefix}lora_b"])
                lead = tree[f"{prefix}lora_a"].ndim - n_in - 1
                out[k] = quantize(v, n_in, v.ndim - lead - n_in)
            else:
                out[k] = v
        return out

    fp8 = keep_fp8(params)
    kept = [x for x in jax.tree.leaves(fp8, is_leaf=lambda x: isinstance(x, Fp8Weight)) if isinstance(x, Fp8Weight)]
    assert len(kept) >= 8 and all(x.q.dtype == jnp.float8_e4m3fn for x in kept)
    dequantized = jax.tree.map(lambda x: x.dequantize() if isinstance(x, Fp8Weight) else x, fp8,
                               is_leaf=lambda x: isinstance(x, Fp8Weight))
    model = dsj.Transformer(CONFIG, options)
    ours = np.asarray(model.apply({"params": fp8}, TOKENS))
    ref = np.asarray(model.apply({"params": dequantized}, TOKENS))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # and the base did change: FP8 is not the fp32 kernel
    assert np.abs(np.asarray(model.apply({"params": params}, TOKENS)) - ref).max() > 1e-4


def test_adapter_dropout_drops_only_the_adapters_input():
    """``lora_dropout``: with x the identity, each output row of the adapters' term is its row of ``scale * A @ B``
    zeroed (dropped) or scaled by 1 / (1 - p); the base's term is untouched; no rng (inference): no dropout; two
    keys draw two masks; in a whole model (every layer in a scanned stack) dropout acts, on the adapters only."""
    from deepseek_jax.layers.linear import Linear

    p, d, f = 0.5, 64, 8
    lora = LoraOptions(rank=4, alpha=8.0, targets=("*",), dropout=p)
    layer = Linear((f,), ("embed", "mlp"), ModelOptions(lora=lora))
    x = jnp.eye(d, dtype=jnp.float32)
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x)["params"])
    params["lora_b"] = jax.random.normal(jax.random.PRNGKey(1), params["lora_b"].shape)
    delta = np.asarray(lora.scale * params["lora_a"] @ params["lora_b"])
    base = np.asarray(params["kernel"])
    np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x)), base + delta, rtol=1e-5, atol=1e-6)
    masks = []
    for seed in (0, 1):
        y = np.asarray(layer.apply({"params": params}, x, rngs={"lora_dropout": jax.random.PRNGKey(seed)}))
        kept = np.abs(y - base).max(1) > 1e-6
        want = np.where(kept[:, None], delta / (1 - p), 0.0)
        np.testing.assert_allclose(y - base, want, rtol=1e-5, atol=1e-6)
        assert 0.3 < kept.mean() < 0.7  # about 1 - p of the 64 rows kept (fixed keys: this cannot flake)
        masks.append(kept)
    assert not np.array_equal(*masks)
    # a whole model: the dense and routed-expert adapters and the scanned layers each draw their masks
    options = ModelOptions(lora=dataclasses.replace(LORA, dropout=p))
    params = _lora_params(options)
    model = dsj.Transformer(CONFIG, options)
    plain = np.asarray(model.apply({"params": params}, TOKENS))
    np.testing.assert_array_equal(plain, np.asarray(dsj.Transformer(CONFIG, ModelOptions(lora=LORA)).apply(
        {"params": params}, TOKENS)))
    dropped = np.asarray(model.apply({"params": params}, TOKENS, rngs={"lora_dropout": jax.random.PRNGKey(0)}))
    assert np.abs(dropped - plain).max() > 1e-3
    no_adapters = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if param_path(path).endswith("lora_b") else v, params)
    np.testing.assert_array_equal(  # with B zero, dropout changes nothing: it acts on the adapters only
        np.asarray(model.apply({"params": no_adapters}, TOKENS, rngs={"lora_dropout": jax.random.PRNGKey(0)})),
        np.asarray(model.apply({"params": no_adapters}, TOKENS)))


def test_lora_errors_name_what_is_wrong():
    from deepseek_jax.parallel.mesh import make_mesh
    from deepseek_jax.posttrain.distill import DistillConfig, DistillTrainer
    from deepseek_jax.posttrain.grpo import GRPOConfig, GRPOTrainer
    from deepseek_jax.training.config import TrainConfig
    from deepseek_jax.training.trainer import Trainer

    mesh = make_mesh(None)
    with pytest.raises(ValueError, match=r"--lora-targets \*nothing\*: no linear layer matches; .*q_b_proj"):
        Trainer(CONFIG, TrainConfig(lora_rank=2, lora_targets=("*nothing*",)), mesh)
    with pytest.raises(ValueError, match="LoRA trains only its adapters"):
        TrainConfig(lora_rank=2, train_only=("*experts*",))
    with pytest.raises(ValueError, match="LoRA rank 0|lora_rank -1"):
        TrainConfig(lora_rank=-1)
    with pytest.raises(ValueError, match="fp8_base and lora_dropout are LoRA settings"):
        TrainConfig(fp8_base=True)
    with pytest.raises(ValueError, match="lora_dropout 1.0: expected a probability"):
        TrainConfig(lora_rank=2, lora_dropout=1.0)
    with pytest.raises(ValueError, match="GRPO with LoRA takes neither lora_dropout nor fp8_base"):
        GRPOTrainer(CONFIG, TrainConfig(lora_rank=2, lora_dropout=0.1), mesh, GRPOConfig())
    with pytest.raises(ValueError, match="distillation with LoRA takes neither lora_dropout nor fp8_base"):
        DistillTrainer(CONFIG, TrainConfig(lora_rank=2, fp8_base=True), mesh, DistillConfig())


@pytest.mark.slow  # two LoRA runs, each compiling its train step
def test_qlora_run_over_an_fp8_release_equals_lora_over_its_dequantized_weights(tmp_path, capsys):
    """``train --init-from FP8_RELEASE --lora-rank R --fp8-weights``: the release's FP8 kernels stay e4m3 + block
    scales through the run (the adapters on top, in the matmuls); its losses and gradient norms equal those of the same
    LoRA run over the release's weights dequantized to fp32 (what transformers loads), adapter dropout included."""
    from convert_fixtures import FP8_CONFIG, make_fp8

    from deepseek_jax.tools.capacity import fp8_kept_kernels

    config = FP8_CONFIG.replace(vocab_size=512, num_nextn_predict_layers=0)
    model, _ = make_fp8(str(tmp_path / "fp8"), config=config, mtp=False)
    model.save_pretrained(str(tmp_path / "dequantized"))
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(f"w{(i + j) % 50 + 10}" for j in range(12))}) + "\n")
    runs = {}
    for name, extra in (("fp8", ["--fp8-weights"]), ("dequantized", [])):
        word_tokenizer(tmp_path / name)
        work = str(tmp_path / f"run-{name}")
        assert main(["train", "--init-from", str(tmp_path / name), "--data", str(data), "--workdir", work,
                     "--steps", "3", "--batch-size", "4", "--seq-len", "16", "--lr", "2e-2", "--warmup", "0",
                     "--save-every", "3", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1"]
                    + extra) == 0
        with open(os.path.join(work, "metrics.jsonl")) as f:
            runs[name] = [json.loads(line) for line in f]
        if name == "fp8":  # every kernel the release quantizes stayed FP8
            assert f"base: {len(fp8_kept_kernels(config))} kernels kept in FP8 as stored" in capsys.readouterr().out
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in runs["fp8"]], [m[key] for m in runs["dequantized"]], rtol=1e-5)
    assert runs["fp8"][-1]["loss"] < runs["fp8"][0]["loss"]
    assert main(["train", "--init-from", str(tmp_path / "dequantized"), "--data", str(data), "--workdir",
                 str(tmp_path / "bad"), "--steps", "1", "--lora-rank", "4", "--fp8-weights"]) == 2
    assert "no FP8 weights to keep" in capsys.readouterr().err


@pytest.mark.slow  # the fixture compiles a LoRA train step
def test_peft_adapter_export_loads_in_peft_with_our_logits(lora_run, tmp_path):
    """``export --adapter``: attention adapters as peft target_modules, the experts' as target_parameters on the
    fused gate_up_proj / down_proj; peft on the transformers base gives the logits of our merged LoRA model."""
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "adapter")
    assert main(["export", lora_run["work"], out, "--adapter"]) == 0
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["rank_pattern"] == {"gate_up_proj": 8}
    assert cfg["base_model_name_or_path"] == os.path.abspath(lora_run["src"])  # the run's lora_base
    assert "model.layers.1.self_attn.kv_b_proj" in cfg["target_modules"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in cfg["target_parameters"]
    weights = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert weights["base_model.model.model.layers.1.mlp.experts.lora_A.weight"].shape == (4 * 16, 32)  # down
    config, params = dsj.load_pretrained(lora_run["work"])
    ours = np.asarray(dsj.Transformer(config).apply({"params": params}, TOKENS))
    base = AutoModelForCausalLM.from_pretrained(lora_run["src"], dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    with pytest.raises(FileExistsError):  # nothing half-written, nothing overwritten
        from deepseek_jax.checkpoint.adapters import export_adapter
        export_adapter(lora_run["work"], out)


def test_adapters_peft_cannot_hold_are_refused():
    from deepseek_jax.checkpoint.adapters import AdapterError, peft_tensors

    params = _lora_params(ModelOptions(lora=LORA))  # LORA targets the dense MLP too
    with pytest.raises(AdapterError, match="dense_layers/mlp/gate_proj: peft .* no PEFT form; export the merged"):
        peft_tensors(CONFIG, params, LORA.rank, LORA.alpha)


def test_bad_peft_adapter_directories_say_what_is_wrong(tmp_path):
    from safetensors.numpy import save_file

    from deepseek_jax.checkpoint.adapters import AdapterError, read_peft_adapter

    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        read_peft_adapter(str(tmp_path), CONFIG)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True}))
    save_file({"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": np.zeros((4, 64), np.float32)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="use_dora = True is not supported"):
        read_peft_adapter(str(tmp_path), CONFIG)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(AdapterError, match="self_attn.o_proj has lora_A only"):
        read_peft_adapter(str(tmp_path), CONFIG)
    save_file({"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": np.zeros((2, 64), np.float32),
               "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight": np.zeros((64, 2), np.float32)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"o_proj.lora_A.weight has 2 rows, expected r = 4"):
        read_peft_adapter(str(tmp_path), CONFIG)


def _logits_from_adapter(src, adapter_dir):
    """Our logits for base ``src`` + the PEFT adapter in ``adapter_dir``, read as ``train --adapter`` reads it."""
    from deepseek_jax.checkpoint.adapters import read_peft_adapter
    from deepseek_jax.checkpoint.load import pretrained_config
    from deepseek_jax.parallel.mesh import make_mesh
    from deepseek_jax.training.config import TrainConfig
    from deepseek_jax.training.run import init_params
    from deepseek_jax.training.trainer import Trainer

    config = pretrained_config(src)
    adapters, rank, targets = read_peft_adapter(adapter_dir, config)
    tc = TrainConfig(lora_rank=rank, lora_alpha=float(rank), lora_targets=targets)
    trainer = Trainer(config, tc, make_mesh(None))
    state = trainer.state_from_params(init_params(src, trainer), adapters)
    return np.asarray(trainer.model.apply({"params": state["params"]}, TOKENS)), rank, targets


@pytest.mark.slow  # the fixture compiles a LoRA train step
def test_peft_adapters_read_back_with_peft_logits(lora_run, tmp_path):
    """A PEFT adapter peft itself created (random A and B, a rank pattern) and our own export, read by ``train
    --adapter``'s reader: our LoRA model gives peft's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    src = lora_run["src"]
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    torch.manual_seed(0)
    peft_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=["q_b_proj", "kv_a_proj_with_mqa", "o_proj"],
                          target_parameters=["model.layers.1.mlp.experts.gate_up_proj"],
                          rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 3})
    model = get_peft_model(base, peft_cfg).eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()
        plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(
            torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()
    assert np.abs(ref - plain).max() > 1e-2  # the adapter matters
    model.save_pretrained(str(tmp_path / "theirs"))
    ours, rank, targets = _logits_from_adapter(src, str(tmp_path / "theirs"))
    assert rank == 4 and "moe_layers/mlp/experts/up_proj" in targets and "dense_layers/self_attn/o_proj" in targets
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # Our export read back: the run's merged logits.
    assert main(["export", lora_run["work"], str(tmp_path / "ours"), "--adapter"]) == 0
    ours, rank, _ = _logits_from_adapter(src, str(tmp_path / "ours"))
    config, params = dsj.load_pretrained(lora_run["work"])
    merged = np.asarray(dsj.Transformer(config).apply({"params": params}, TOKENS))
    assert rank == 8  # the fused gate_up adapter's 2R
    np.testing.assert_allclose(ours, merged, atol=1e-5, rtol=0)
    # and train --adapter starts a run from it
    work = str(tmp_path / "again")
    assert main(["train", "--init-from", src, "--adapter", str(tmp_path / "theirs"), "--data",
                 os.path.join(os.path.dirname(src), "data.jsonl"), "--workdir", work, "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--lr", "0", "--warmup", "0"]) == 0
    _, again = dsj.load_pretrained(work)
    np.testing.assert_allclose(np.asarray(dsj.Transformer(config).apply({"params": again}, TOKENS)), ref,
                               atol=1e-4, rtol=0)  # lr 0: the adapter as it came
    assert main(["train", "--init-from", src, "--adapter", str(tmp_path / "theirs"), "--lora-rank", "2",
                 "--workdir", str(tmp_path / "x")]) == 2


@pytest.mark.slow  # three short LoRA runs
def test_lora_run_resumes_from_its_adapters_bit_identically(lora_run, tmp_path):
    """A LoRA run stopped after 2 of 4 steps and resumed (its checkpoint: adapters and their moments; the base
    read again from init_from) logs the same losses as one uninterrupted run."""
    from deepseek_jax.training.config import TrainConfig
    from deepseek_jax.training.run import fit

    config = dsj.ModelConfig.from_pretrained(lora_run["src"])
    tc = TrainConfig(steps=4, batch_size=2, seq_len=16, learning_rate=1e-2, warmup_steps=0, lora_rank=2,
                     lora_alpha=4.0)
    data = os.path.join(os.path.dirname(lora_run["src"]), "data.jsonl")
    tok = _tokenizer(lora_run["src"])
    kw = dict(data=data, tokenizer=tok, init_from=lora_run["src"], save_every=2, progress=False, async_save=False)
    straight = [r["loss"] for r in fit(config, tc, str(tmp_path / "a"), **kw)]
    first = [r["loss"] for r in fit(config, tc, str(tmp_path / "b"), stop_after=2, **kw)]
    rest = [r["loss"] for r in fit(config, tc, str(tmp_path / "b"), **kw)]
    assert len(first) == 2 and len(rest) == 2
    assert first + rest == straight
    with pytest.raises(ValueError, match="LoRA fine-tunes a checkpoint: give init_from"):
        fit(config, tc, str(tmp_path / "c"), data=data, tokenizer=tok)


def _tokenizer(directory):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
