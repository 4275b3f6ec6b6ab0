"""The FP8-weight matmul kernel (``fp8_matmul``): per-block dequantization inside a Pallas kernel, run here in
Pallas' interpreter; against XLA's dequantize-then-dot, alone, in the linear layers, in the model, and sharded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.linear import MatmulRecipe
from deepseek_jax.ops import contract_last
from deepseek_jax.quant.kernel import block_sizes
from deepseek_jax.quant.kernel import fp8_weight_matmul as fp8_matmul
from deepseek_jax.quant.weights import Fp8Weight, quantize

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helpers


def _case(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    # Blocks of very different magnitudes, so a scale applied to the wrong block shows.
    w = rng.normal(size=(k, n)) * np.exp(rng.normal(size=(k // 128, 1, n // 128, 1)) * 2).repeat(128, 1).repeat(
        128, 3).reshape(k, n)
    return x, quantize(jnp.asarray(w, jnp.float32))


def test_block_sizes():
    assert block_sizes(4096, 7168, 2048) == (256, 1024, 512)
    assert block_sizes(1, 7168, 18432) == (16, 1024, 512)  # decode: one row padded to bf16's 16
    assert block_sizes(300, 1536, 384) == (256, 1536, 128)  # K no multiple of 1024: all of K in one step
    assert block_sizes(8, 640, 512) == (16, 640, 512)
    assert block_sizes(8, 512, 576) is None  # N = kv_lora + rope: partial block, the XLA path
    assert block_sizes(8, 16384 + 128, 512) is None  # K too long for one step and no multiple of 1024


def test_quantize_matches_the_release_rule():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(200, 130)), jnp.float32).at[128:, 128:].set(0.0)
    f = quantize(w)
    assert f.q.dtype == jnp.float8_e4m3fn and f.scale.shape == (2, 2)
    np.testing.assert_allclose(f.scale[0, 0], jnp.max(jnp.abs(w[:128, :128])) / 448, rtol=1e-7)
    assert float(f.scale[1, 1]) == 1.0  # an all-zero block
    # e4m3 has 3 mantissa bits: every value within 2^-4 relative (plus the smallest subnormal) of the original.
    err = np.abs(np.asarray(f.dequantize() - w))
    assert np.all(err <= np.abs(np.asarray(w)) / 16 + np.asarray(jnp.repeat(jnp.repeat(f.scale, 128, 0), 128, 1))[
        :200, :130] * 2.0 ** -9)


@pytest.mark.parametrize("m,k,n", [(5, 256, 384), (300, 2048, 512), (17, 1536, 128)])
def test_kernel_equals_the_dequantized_matmul(m, k, n):
    """fp32: the same products, summed in another order (bound 1e-6 of sum |x| |w| per output); bf16: the same bf16
    weights (q * scale in fp32, then cast) and fp32 accumulation, so at most an occasional last-bit difference."""
    x, w = _case(m, k, n)
    out = jax.jit(lambda x, q, s: fp8_matmul(x, q, s, jnp.float32, jnp.float32, True))(x, w.q, w.scale)
    ref = jnp.dot(x, w.dequantize(), precision="highest")
    assert out.shape == (m, n) and out.dtype == jnp.float32
    bound = 1e-6 * jnp.dot(jnp.abs(x), jnp.abs(w.dequantize()), precision="highest")
    assert bool(jnp.all(jnp.abs(out - ref) <= bound))
    xb = x.astype(jnp.bfloat16)
    ob = fp8_matmul(xb, w.q, w.scale, jnp.bfloat16, jnp.bfloat16, True)
    rb = jnp.dot(xb, w.dequantize(jnp.bfloat16), preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    diff = np.abs(np.asarray(ob, np.float32) - np.asarray(rb, np.float32))
    assert ob.dtype == jnp.bfloat16 and np.mean(diff > 0) < 2e-3
    # Where they differ, by one bf16 rounding step of sums that differ by the fp32 bound above.
    assert np.all(diff <= 2 ** -7 * np.abs(np.asarray(rb, np.float32)) + 2 * np.asarray(bound))


def test_gradient_with_respect_to_x():
    x, w = _case(24, 256, 256)
    loss = lambda x, f: jnp.sum(jnp.sin(f(x)))  # noqa: E731
    g = jax.grad(loss)(x, lambda x: fp8_matmul(x, w.q, w.scale, jnp.float32, jnp.float32, True))
    ref = jax.grad(loss)(x, lambda x: jnp.dot(x, w.dequantize(), precision="highest"))
    np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


def _recipe_out(mode, x, w, dims):
    recipe = MatmulRecipe(jnp.float32, fp8_kernel=mode)
    fn = jax.jit(lambda x, w: recipe.dot_general(x, w, dims))
    return fn(x, w), str(jax.make_jaxpr(fn)(x, w))


def test_the_recipe_routes_fp8_kernels_through_the_kernel():
    """A ``[B, T, heads, head_dim] -> [B, T, D]`` projection (two contracted dims, like o_proj) on an FP8 kernel:
    the kernel's path equals XLA's; a kernel whose columns end in a partial block, or a stacked one, stays on XLA."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 3, 2, 64)), jnp.float32)
    w = quantize(jnp.asarray(rng.normal(size=(2, 64, 256)), jnp.float32), n_in=2, n_out=1)
    dims = contract_last(2, x.ndim)
    out, jaxpr = _recipe_out("interpret", x, w, dims)
    ref, ref_jaxpr = _recipe_out(None, x, w, dims)
    assert "pallas_call" in jaxpr and "pallas_call" not in ref_jaxpr and out.shape == (2, 3, 256)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    odd = quantize(jnp.asarray(rng.normal(size=(128, 192)), jnp.float32))
    _, jaxpr = _recipe_out("interpret", x[..., 0, :].repeat(2, -1), odd, contract_last(1, 3))
    assert "pallas_call" not in jaxpr
    stacked = quantize(jnp.asarray(rng.normal(size=(2, 128, 128)), jnp.float32))
    assert isinstance(stacked, Fp8Weight) and stacked.scale.shape == (2, 1, 1)


def test_options_pick_the_kernel_per_platform():
    from deepseek_jax.layers.linear import fp8_kernel_mode

    assert fp8_kernel_mode(ModelOptions()) is None  # CPU here: "auto" dequantizes in XLA
    assert fp8_kernel_mode(ModelOptions(platform="tpu")) == "tpu"
    assert fp8_kernel_mode(ModelOptions(fp8_weight_matmul="pallas")) == "interpret"
    assert fp8_kernel_mode(ModelOptions(platform="tpu", fp8_weight_matmul="xla")) is None
    with pytest.raises(ValueError, match="fp8_weight_matmul"):
        ModelOptions(fp8_weight_matmul="cuda")


# Every linear dim a multiple of 128 except kv_a_proj's output (kv_lora + rope = 192, the XLA path).
ALIGNED = dsj.ModelConfig(
    vocab_size=300, hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
    qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
    first_k_dense_replace=1, n_group=2, topk_group=1, max_position_embeddings=512, rope_scaling=None,
)


@pytest.fixture(scope="module")
def aligned_fp8(tmp_path_factory):
    from convert_fixtures import make_fp8

    path = str(tmp_path_factory.mktemp("fp8k") / "release")
    make_fp8(path, config=ALIGNED, n_files=2)
    return path


def test_model_on_fp8_weights_through_the_kernel(aligned_fp8):
    """The model on FP8-kept weights with the kernel (interpreted) equals the XLA dequantized path (fp32, 1e-5)."""
    from convert_fixtures import TOKENS

    config, kept = dsj.load_pretrained(aligned_fp8, dtype="fp8")
    assert isinstance(kept["dense_layers"]["self_attn"]["o_proj"]["kernel"], Fp8Weight)
    tokens = TOKENS[:, :9] % config.vocab_size
    logits = {}
    for mode in ("pallas", "xla"):
        model = dsj.Transformer(config, ModelOptions(fp8_weight_matmul=mode))
        fn = jax.jit(lambda p, t: model.apply({"params": p}, t))
        logits[mode] = np.asarray(fn(kept, tokens))
        if mode == "pallas":
            assert str(jax.make_jaxpr(fn)(kept, tokens)).count("pallas_call") >= 6
    np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=1e-5, rtol=0)


SHARDED = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from deepseek_jax.quant.kernel import fp8_weight_matmul as fp8_matmul
from deepseek_jax.quant.weights import quantize
mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(64, 512)), jnp.float32)
w = quantize(jnp.asarray(rng.normal(size=(512, 512)), jnp.float32))
ref = np.asarray(jnp.dot(x, w.dequantize(), precision="highest"))
bound = 1e-6 * np.asarray(jnp.dot(jnp.abs(x), jnp.abs(w.dequantize()), precision="highest"))
out = {}
# (rows of x, K of the weight, N of the weight)
for name, xs, ks, ns in [("rows over data, K over fsdp, N over tensor", "data", "fsdp", "tensor"),
                         ("rows and K over fsdp (FSDP)", ("data", "fsdp"), "fsdp", "tensor"),
                         ("replicated", None, None, None)]:
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    args = (put(x, P(xs, None)), put(w.q, P(ks, ns)), put(w.scale, P(ks, ns)))
    fn = lambda x, q, s: fp8_matmul(x, q, s, jnp.float32, jnp.float32, True, mesh, (xs, ks, ns))
    compiled = jax.jit(fn).lower(*args).compile()
    text = compiled.as_text()
    y = compiled(*args)
    out[name] = {"within": bool(np.all(np.abs(np.asarray(y) - ref) <= bound)),
                 "spec": [str(a) for a in y.sharding.spec],
                 "all_reduce": "all-reduce(" in text,
                 # the weight gathered along K: all 512 rows of a device's 256 columns (XLA:CPU converts the
                 # e4m3 values to f16 for the collective)
                 "gathers_weight": re.search(r"= \w+\[512,256\]\S* all-gather\(", text) is not None}
print("RESULT " + json.dumps(out))
"""


def test_kernel_sharded_on_8_devices():
    """On a mesh each device runs the kernel on its shards: no gather of the weight where x's rows and the
    weight's K use different axes (partial sums all-reduced), FSDP's gather of K where they share one."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    for name, r in out.items():  # fp32 sums in another order: within 1e-6 of sum |x| |w| per output
        assert r["within"], (name, r)
    a = out["rows over data, K over fsdp, N over tensor"]
    assert a["spec"] == ["data", "tensor"] and a["all_reduce"] and not a["gathers_weight"], a
    b = out["rows and K over fsdp (FSDP)"]
    assert b["spec"] == ["('data', 'fsdp')", "tensor"] and b["gathers_weight"] and not b["all_reduce"], b


@pytest.mark.parametrize("impl", ["gather", "blocked", "ragged", "dense"])
def test_fp8_expert_stacks_dequantize_only_what_the_grouped_gemm_reads(impl):
    """FP8-kept expert stacks enter the grouped GEMM as they are: every path equals the dequantized stacks (fp32),
    and "gather" (small-batch decode: the chosen experts) and "blocked" (one expert per block) never build the
    dequantized [E, D, I] stack, which "ragged" and "dense" do (their GEMMs take whole stacks)."""
    from deepseek_jax.moe.dispatch import dispatch_local

    e, d, i, n, k = 6, 128, 256, 2, 2
    rng = np.random.default_rng(4)
    stacks = [quantize(jnp.asarray(rng.normal(size=shape) * 0.1, jnp.float32))
              for shape in ((e, d, i), (e, d, i), (e, i, d))]
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    weights = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
    idx = jnp.asarray([[1, 4], [4, 5]], jnp.int32)
    recipe = MatmulRecipe(jnp.float32)
    run = lambda *w: dispatch_local(recipe, x, weights, idx, *w, impl, 8)  # noqa: E731
    ref = dispatch_local(recipe, x, weights, idx, *(w.dequantize() for w in stacks), "dense")
    np.testing.assert_allclose(jax.jit(run)(*stacks), ref, atol=1e-6, rtol=1e-6)
    whole = f"f32[{e},{d},{i}]"
    assert (whole in str(jax.make_jaxpr(run)(*stacks))) == (impl in ("ragged", "dense"))


MODEL_SHARDED = r"""
import json, sys
import jax, numpy as np
import deepseek_jax as dsj
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.parallel.mesh import make_mesh, mesh_context
from convert_fixtures import TOKENS
mesh = make_mesh("fsdp=2,expert=2,tensor=2")
config, kept = dsj.load_pretrained(sys.argv[1], dtype="fp8", mesh=mesh)
_, ref = dsj.load_pretrained(sys.argv[1], dtype="fp8", mesh=make_mesh(None, jax.devices()[:1]))
tokens = TOKENS[:, :8] % config.vocab_size
model = dsj.Transformer(config, ModelOptions(fp8_weight_matmul="pallas"))
fn = jax.jit(lambda p, t: model.apply({"params": p}, t))
with mesh_context(mesh):
    a = np.asarray(fn(kept, tokens))
    jaxpr = str(jax.make_jaxpr(fn)(kept, tokens))
b = np.asarray(dsj.Transformer(config, ModelOptions(fp8_weight_matmul="xla")).apply({"params": ref}, tokens))
print("RESULT " + json.dumps({"diff": float(np.abs(a - b).max()), "kernels": jaxpr.count("pallas_call"),
                              "shard_maps": jaxpr.count("shard_map")}))
"""


@pytest.mark.slow  # a subprocess compiling the sharded model with interpreted kernels: ~1 min on 2 cores
def test_model_on_fp8_weights_through_the_kernel_on_8_devices(aligned_fp8):
    """Sharded over fsdp x expert x tensor, the kernel runs per device (shard_map) and the logits equal one
    device's XLA path."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = HERE + os.pathsep + os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", MODEL_SHARDED, aligned_fp8], env=env, capture_output=True,
                          text=True, timeout=900, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert out["diff"] < 1e-5 and out["kernels"] >= 6 and out["shard_maps"] >= out["kernels"], out
