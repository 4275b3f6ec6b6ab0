"""deepseek_jax.tools.capacity (and `deepseek-jax plan --capacity`): inference memory by hand, against hand-computed
formulas for the DeepSeek-V3 preset and jax's own shard shapes."""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

import deepseek_jax as dsj
from deepseek_jax.cli import main
from deepseek_jax.models.counts import param_counts
from deepseek_jax.parallel.mesh import MESH_AXES
from deepseek_jax.parallel.rules import param_shardings
from deepseek_jax.tools import capacity

V3 = dsj.presets["deepseek-v3"]
MESH = {"fsdp": 4, "expert": 16}  # 64 chips: v5p:4x4x4


def test_latent_cache_per_token_is_the_formula():
    # (kv_lora_rank + qk_rope_head_dim) values per layer per token: (512 + 64) x 61 layers.
    assert capacity.cache_bytes_per_token(V3, "bfloat16") == (512 + 64) * 2 * 61 == 70_272
    assert capacity.cache_bytes_per_token(V3, "float32") == (512 + 64) * 4 * 61
    assert capacity.cache_bytes_per_token(V3, "fp8") == ((512 + 64) * 1 + 2 * 4) * 61  # + two fp32 scales


def test_v3_weights_and_largest_batch_by_hand():
    hbm = capacity.CHIP_MEMORY["v5p"]
    cap = capacity.inference_capacity(V3, MESH, hbm, contexts=(4096, 32768), reserve=0.1)
    params = sum(param_counts(V3).values())
    # bf16 everywhere except the routers' correction biases (fp32): 58 MoE layers + 1 MTP layer, 256 experts.
    biases = (V3.num_hidden_layers - V3.first_k_dense_replace + V3.num_nextn_predict_layers) * V3.n_routed_experts
    assert cap.weight_bytes_total == 2 * params + 2 * biases
    # Per device: every leaf's shard as jax computes it for the same rules on an abstract 64-device mesh.
    mesh = AbstractMesh(tuple(MESH.get(a, 1) for a in MESH_AXES), MESH_AXES)
    boxed = jax.eval_shape(dsj.Transformer(V3).init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    shapes = nn.meta.unbox(boxed)
    shardings = param_shardings(boxed, mesh)
    local = 0
    for (path, x), sharding in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(shardings)):
        bias = str(getattr(path[-1], "key", "")) == "e_score_correction_bias"
        local += math.prod(sharding.shard_shape(x.shape)) * (4 if bias else 2)
    assert cap.weight_bytes_per_device == local
    assert cap.weight_bytes_per_device == pytest.approx(cap.weight_bytes_total / 64, rel=0.01)
    # Largest batch: sequences split over data x fsdp x expert = 64 devices, each holding whole sequences.
    free = int(hbm * 0.9) - cap.weight_bytes_per_device
    assert cap.batch_ways == 64
    for context in (4096, 32768):
        assert cap.max_batch[context] == (free // (context * 70_272)) * 64
        assert cap.cache_bytes_per_sequence(context) == context * 70_272
    # 21.3 GB of weights per chip leaves 71.2 GB of the 92.5 GB: 1,920 sequences of 32k tokens on 64 chips.
    assert cap.max_batch[32768] == 1920


def test_fp8_weights_are_a_byte_each_plus_block_scales():
    c = dsj.presets["tiny-v3"]
    bf16, _ = capacity.weight_bytes(c, {}, "bfloat16")
    fp8, _ = capacity.weight_bytes(c, {}, "fp8")
    # By hand, the linears the FP8 release quantizes: every layer linear but the router, incl. the MTP block's.
    d, h, e, i, s = c.hidden_size, c.num_attention_heads, c.n_routed_experts, c.moe_intermediate_size, \
        c.n_shared_experts * c.moe_intermediate_size
    blocks = lambda r, k: math.ceil(r / 128) * math.ceil(k / 128)  # noqa: E731
    attn = [(c.q_lora_rank, d), (h * c.qk_head_dim, c.q_lora_rank), (c.kv_cache_dim, d),
            (h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank), (d, h * c.v_head_dim)]
    dense = [(c.intermediate_size, d)] * 2 + [(d, c.intermediate_size)]
    moe = [(i, d)] * 2 * e + [(d, i)] * e + [(s, d)] * 2 + [(d, s)]
    n_dense, n_moe = c.first_k_dense_replace, c.num_hidden_layers - c.first_k_dense_replace + \
        c.num_nextn_predict_layers
    mats = (attn + dense) * n_dense + (attn + moe) * n_moe
    elements = sum(r * k for r, k in mats)
    scales = 4 * sum(blocks(r, k) for r, k in mats)
    assert fp8 == bf16 - 2 * elements + elements + scales


def test_plan_capacity_cli(tmp_path, capsys):
    out = tmp_path / "cap.json"
    assert main(["plan", "deepseek-v3", "--topology", "v5p:4x4x4", "--mesh", "fsdp=4,expert=16", "--capacity",
                 "--contexts", "32768", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    # The default reserve (15%): 28 sequences of 32k per chip, 1,792 on 64 chips, the largest batch whose decode
    # step the TPU compiler fits (100.50 GB of 102.80; 1,920 needs 106.17 GB: bench/RESULTS.md).
    assert "70,272 bytes per token" in text and "1,792" in text
    d = json.loads(out.read_text())["inference_capacity"]
    assert d["max_batch"] == {"32768": 1792} and d["devices"] == 64
    assert main(["plan", "deepseek-v3", "--topology", "v9z:4x4", "--capacity"]) == 2
    assert "pass --device-memory" in capsys.readouterr().err


@pytest.mark.slow  # two decode compiles of tiny-v3: ~30 s on 2 cores
def test_plan_compiles_decode_on_fp8_kept_weights():
    """``plan(..., weight_dtype="fp8")`` compiles the decode step on ``Fp8Weight`` params: the step's state is
    the hand count's FP8 weights (plus the same cache)."""
    from deepseek_jax.tools.plan import plan

    c = dsj.presets["tiny-v3"].replace(num_hidden_layers=2)
    steps = {wd: plan(c, batch=2, seq_len=16, steps=["decode"], weight_dtype=wd).steps[0] for wd in (None, "fp8")}
    bf16, _ = capacity.weight_bytes(c, {}, "bfloat16")  # plan's default inference dtype
    fp8, _ = capacity.weight_bytes(c, {}, "fp8")
    assert steps["fp8"].compiled and steps[None].compiled
    assert steps[None].state_bytes - steps["fp8"].state_bytes == bf16 - fp8
    # The compiled arguments (the weights decode reads: no MTP block) shrink too.
    assert steps["fp8"].argument_bytes < steps[None].argument_bytes - (bf16 - fp8) / 2


@pytest.mark.slow  # two decode compiles of tiny-v4: ~40 s on 2 cores
def test_v4_capacity_keeps_fp4_experts_and_its_compressed_cache():
    """V4 with ``weight_dtype="fp8"``: the routed experts count half a byte per weight plus a bf16 scale per 32
    inputs, the other quantized kernels a byte plus an fp32 scale per 128 x 128 block (by hand from the tensor
    map), and the compiled decode step's state shrinks by exactly that; the cache per sequence is
    ``v4_cache_bytes`` (a window ring and pooled entries, not linear in the context)."""
    from deepseek_jax.checkpoint.hf_map import hf_tensor_map
    from deepseek_jax.layers.kv_cache import v4_cache_bytes
    from deepseek_jax.tools.plan import plan

    c = dsj.presets["tiny-v4"]
    kept = capacity.fp8_kept_kernels(c)
    shapes = {tm.path: tm.shape for tm in hf_tensor_map(c)}
    fp4_paths = [p for p, v in kept.items() if v[3].Q_BITS == 4]
    assert fp4_paths and all(p[-2] == "experts" for p in fp4_paths)
    n_fp4 = sum(math.prod(shapes[p]) for p in fp4_paths)
    n_fp8 = sum(math.prod(shapes[p]) for p in kept if p not in fp4_paths)
    blocks = sum(math.prod(kept[p][2]) for p in kept if p not in fp4_paths)
    bf16, _ = capacity.weight_bytes(c, {}, "bfloat16")
    fp8, _ = capacity.weight_bytes(c, {}, "fp8")
    assert fp8 == bf16 - 2 * (n_fp4 + n_fp8) + (n_fp4 // 2 + 2 * (n_fp4 // 32)) + (n_fp8 + 4 * blocks)
    cap = capacity.inference_capacity(c, {}, 10**9, contexts=(16, 64))
    assert cap.cache_bytes_per_sequence(64) == sum(v4_cache_bytes(c, 64).values())
    steps = {wd: plan(c, batch=2, seq_len=16, steps=["decode"], weight_dtype=wd).steps[0] for wd in (None, "fp8")}
    assert steps["fp8"].compiled and steps[None].compiled
    assert steps[None].state_bytes - steps["fp8"].state_bytes == bf16 - fp8
