"""deepseek_jax.parallel.rules: the rules table shards every large weight over the whole mesh (shapes only)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

import deepseek_jax as dsj
from deepseek_jax.parallel.mesh import MESH_AXES
from deepseek_jax.parallel.rules import logical_rules, logical_sharding, param_shardings

V3 = dsj.presets["deepseek-v3"]


def _ways(spec: PartitionSpec, mesh) -> int:
    axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    assert len(axes) == len(set(axes)), spec  # an axis shards at most one dim
    return math.prod(mesh.shape[a] for a in axes)


@pytest.fixture(scope="module")
def v3_boxed():
    model = dsj.Transformer(V3)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]


def _mesh(**sizes):
    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)


@pytest.mark.parametrize("sizes", [dict(fsdp=8, expert=8), dict(fsdp=16, expert=4), dict(data=4, fsdp=4, expert=4),
                                   dict(fsdp=4, expert=8, tensor=2), dict(data=2, fsdp=2, expert=16),
                                   dict(fsdp=4, expert=8, context=2)])
def test_v3_every_leaf_over_4mb_is_sharded_at_least_16_ways(v3_boxed, sizes):
    """DeepSeek-V3 (671B) on 64 devices: every weight larger than 4 MB (fp32 master copy) is split at least 16
    ways; with fsdp x expert x context = 64 every one of them is split all 64 ways. (With tensor > 1, a weight
    whose only tensor-shardable dim is not its largest may be split over the FSDP axes only.)"""
    mesh = _mesh(**sizes)
    shardings = param_shardings(v3_boxed, mesh)
    shapes = jax.tree.leaves(jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, v3_boxed,
                                          is_leaf=lambda b: hasattr(b, "value")))
    checked = 0
    for (path, sharding), leaf in zip(jax.tree_util.tree_leaves_with_path(shardings), shapes):
        if math.prod(leaf.shape) * 4 <= 4 * 2**20:
            continue
        ways = _ways(sharding.spec, mesh)
        assert ways >= 16, (jax.tree_util.keystr(path), leaf.shape, sharding.spec)
        if sizes.get("fsdp", 1) * sizes.get("expert", 1) * sizes.get("context", 1) == 64:
            assert ways == 64, (jax.tree_util.keystr(path), leaf.shape, sharding.spec)
        checked += 1
    assert checked > 20


def test_data_joins_fsdp_when_asked(v3_boxed):
    mesh = _mesh(data=4, fsdp=4, expert=4)
    plain = param_shardings(v3_boxed, mesh)
    zero3 = param_shardings(v3_boxed, mesh, logical_rules(fsdp_over_data=True))
    q_b = ("dense_layers", "self_attn", "q_b_proj", "kernel")

    def spec(tree):
        for k in q_b:
            tree = tree[k]
        return tree.spec

    assert _ways(spec(plain), mesh) == 16 and _ways(spec(zero3), mesh) == 64
    assert spec(zero3) == PartitionSpec(None, ("data", "fsdp", "expert"), None, None)
    # Expert weights never leave the expert axis; their model dim is FSDP-sharded.
    experts = zero3["moe_layers"]["mlp"]["experts"]["gate_proj"].spec
    assert experts == PartitionSpec(None, "expert", ("data", "fsdp"), None)
    # With a context axis, weights are FSDP-sharded over it too.
    ctx = param_shardings(v3_boxed, _mesh(fsdp=4, expert=4, context=4))
    assert spec(ctx) == PartitionSpec(None, ("fsdp", "expert", "context"), None, None)


def test_a_dim_that_does_not_divide_takes_the_largest_product_that_does():
    mesh = _mesh(fsdp=8, expert=4)
    with pytest.warns(UserWarning, match="'kv_lora' of size 24 does not divide"):
        s = logical_sharding(("kv_lora", "heads"), (24, 8), mesh)
    assert s.spec == PartitionSpec("fsdp", None)  # 8 divides 24, 32 and 4 x 8 do not; 8 > 4
    assert logical_sharding(("kv_lora",), (12,), mesh).spec == PartitionSpec("expert")
    assert logical_sharding(("kv_lora",), (7,), mesh).spec == PartitionSpec(None)
    assert logical_sharding(("kv_lora",), (64,), mesh).spec == PartitionSpec(("fsdp", "expert"))


def test_optimizer_state_follows_its_params():
    from deepseek_jax.training.config import TrainConfig
    from deepseek_jax.training.trainer import Trainer

    config = V3.replace(num_hidden_layers=4)
    trainer = Trainer(config, TrainConfig(precision="bf16"), _mesh(fsdp=8, expert=8))
    state = trainer.abstract_state()
    params = jax.tree_util.tree_leaves_with_path(state["params"])
    adam = state["opt_state"][1]  # (clip, adam, ...): scale_by_adam's state
    for moment in (adam.mu, adam.nu):
        for (path, p), m in zip(params, jax.tree.leaves(moment)):
            assert m.sharding.spec == p.sharding.spec, jax.tree_util.keystr(path)
    # fp32 params + two fp32 moments = 12 bytes per parameter, split 64 ways (every leaf divides here).
    per_device = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                     for x in jax.tree.leaves({"p": state["params"], "o": state["opt_state"]}))
    n = sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"]))
    assert per_device <= 12 * n / 64 * 1.001
