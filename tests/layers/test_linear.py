"""deepseek_jax.layers.linear.LogitsRecipe: the output head's dot, fp32 logits; with a 16-bit compute dtype its backward
runs in 16 bits like every other matmul's (no fp32 copy of the vocabulary matrix's gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.layers.linear import LogitsRecipe

DIMS = (((1,), (0,)), ((), ()))


def _data():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.normal(size=(16, 48)), jnp.float32)
    w = jnp.asarray(rng.normal(0, 0.1, size=(48, 80)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(16, 80)), jnp.float32)
    return x, w, g


def test_bf16_logits_are_fp32_and_their_backward_is_bf16():
    x, w, g = _data()
    recipe = LogitsRecipe(jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, b: recipe.dot_general(a, b, DIMS), x, w)
    bf = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), bf(x) @ bf(w), rtol=1e-5, atol=1e-5)
    dx, dw = vjp(g)
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32  # the primal dtypes
    # By hand: the cotangent rounded to bf16, the products accumulated, the results rounded to bf16.
    want_dw, want_dx = bf(x).T @ bf(g), bf(g) @ bf(w).T
    np.testing.assert_allclose(np.asarray(dw), bf(jnp.asarray(want_dw)), rtol=2 ** -7, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), bf(jnp.asarray(want_dx)), rtol=2 ** -7, atol=1e-6)
    assert np.all(np.asarray(dw) == bf(dw)) and np.all(np.asarray(dx) == bf(dx))  # bf16 values
    # The transposed dots output bf16 (the forward's outputs fp32).
    jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: (recipe.dot_general(a, b, DIMS) * g).sum(), argnums=(0, 1)))(x, w)
    outs = [str(e.params["preferred_element_type"]) for e in _dots(jaxpr.jaxpr)]
    assert sorted(outs) == ["bfloat16", "bfloat16", "float32"], outs


def test_fp32_logits_backward_is_the_plain_gradient():
    x, w, g = _data()
    recipe = LogitsRecipe(jnp.float32)
    dx, dw = jax.grad(lambda a, b: (recipe.dot_general(a, b, DIMS) * g).sum(), argnums=(0, 1))(x, w)
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    np.testing.assert_allclose(np.asarray(dw), x64.T @ g64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), g64 @ w64.T, rtol=1e-5, atol=1e-5)


def test_cpu_weight_gradient_form_matches_the_plain_gradient():
    """On CPU (``platform="cpu"``) ``x @ kernel`` differentiates through ``_cpu_weight_grad_dot``: the same values
    and gradients as the plain dot (fp32 and bf16, one and two contracted dims, 3-D activations), and in the
    compiled gradient no weight-gradient dot contracts the lhs's dim 0, the form XLA:CPU runs in Eigen at a
    fraction of its XNNPACK throughput."""
    import re

    from deepseek_jax.layers.linear import MatmulRecipe
    from deepseek_jax.ops import contract_last

    rng = np.random.RandomState(1)
    for dtype, n_in, xs, ws in ((jnp.float32, 1, (2, 8, 48), (48, 80)), (jnp.float32, 2, (16, 4, 12), (4, 12, 80)),
                                (jnp.bfloat16, 1, (16, 48), (48, 5, 16))):
        x = jnp.asarray(rng.normal(size=xs), jnp.float32)
        w = jnp.asarray(rng.normal(0, 0.1, size=ws), jnp.float32)
        dims = contract_last(n_in, x.ndim)
        g = jnp.asarray(rng.normal(size=xs[:x.ndim - n_in] + ws[n_in:]), jnp.float32)
        outs = {}
        for platform in (None, "cpu"):
            recipe = MatmulRecipe(dtype, platform=platform)
            f = lambda a, b: (recipe.dot_general(a, b, dims).astype(jnp.float32) * g).sum()  # noqa: E731
            outs[platform] = (recipe.dot_general(x, w, dims), *jax.grad(f, argnums=(0, 1))(x, w))
            if platform == "cpu" and dtype == jnp.float32:
                hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).compile().as_text()
                assert not re.search(r"dot\([^\n]*lhs_contracting_dims=\{0", hlo), hlo
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        for got, want in zip(outs["cpu"], outs[None]):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def _dots(jaxpr):
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            yield e
        for sub in jax.core.subjaxprs(e) if hasattr(jax.core, "subjaxprs") else _params_jaxprs(e):
            yield from _dots(sub)


def _params_jaxprs(e):
    for v in e.params.values():
        if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
            yield v.jaxpr
        elif hasattr(v, "eqns"):
            yield v


def test_embedding_lookup_gradient_is_the_fp32_scatter_of_the_cotangent():
    from deepseek_jax.layers.embed import embedding_lookup

    rng = np.random.RandomState(1)
    table = jnp.asarray(rng.normal(size=(11, 6)), jnp.float32)
    tokens = jnp.asarray([[3, 3, 0, 10], [3, 7, 7, 3]], jnp.int32)  # repeats: their cotangents add up
    g = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.bfloat16)
    for dtype in (jnp.float32, jnp.bfloat16):
        out, vjp = jax.vjp(lambda t: embedding_lookup(t, tokens, dtype), table)
        want = np.asarray(table, np.float64)[np.asarray(tokens)]
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2 ** -8 if dtype == jnp.bfloat16 else 0)
        (grad,) = vjp(g.astype(dtype))
        hand = np.zeros((11, 6))
        for (b, t), tok in np.ndenumerate(np.asarray(tokens)):
            hand[tok] += np.asarray(g[b, t], np.float64)
        assert grad.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(grad), hand, rtol=1e-6, atol=1e-6)


LOOKUP_MESH = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from deepseek_jax.layers.embed import embedding_lookup
from deepseek_jax.parallel.mesh import make_mesh, mesh_context
mesh = make_mesh("fsdp=4,expert=2")
rng = np.random.RandomState(2)
table = jnp.asarray(rng.normal(size=(96, 64)), jnp.float32)
tokens = jnp.asarray(rng.randint(0, 96, (8, 16)), jnp.int32)
g = jnp.asarray(rng.normal(size=(8, 16, 64)), jnp.float32)
loss = lambda t, ids: jnp.sum(embedding_lookup(t, ids, jnp.bfloat16).astype(jnp.float32) * g)
ref_out = np.asarray(embedding_lookup(table, tokens, jnp.bfloat16), np.float32)
ref_grad = np.asarray(jax.grad(loss)(table, tokens))
# As the rules place them: the table's rows (vocabulary) over fsdp x expert, the tokens' batch over them too.
t_sh, b_sh = NamedSharding(mesh, P(("fsdp", "expert"), None)), NamedSharding(mesh, P(("fsdp", "expert"), None))
fn = jax.jit(lambda t, ids: (embedding_lookup(t, ids, jnp.bfloat16), jax.grad(loss)(t, ids)),
             in_shardings=(t_sh, b_sh), out_shardings=(NamedSharding(mesh, P(("fsdp", "expert"))), t_sh))
with mesh_context(mesh):
    compiled = fn.lower(table, tokens).compile()
    out, grad = compiled(jax.device_put(table, t_sh), jax.device_put(tokens, b_sh))
text = compiled.as_text()
gathers = [l.split("=")[1].split()[0] for l in text.splitlines() if " all-gather(" in l]
print("RESULT " + json.dumps({"out": float(np.abs(np.asarray(out, np.float32) - ref_out).max()),
                              "grad": float(np.abs(np.asarray(grad) - ref_grad).max()), "gathers": gathers}))
"""


def test_embedding_lookup_under_a_mesh_splits_the_model_dim():
    """On 8 devices, with the table's rows split over the vocabulary and the tokens over the batch (as the rules
    place them): values and gradient equal one device's, and neither the whole table nor the whole batch's
    cotangents ([8, 16, 64]) is all-gathered (only the token ids are)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", LOOKUP_MESH], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert out["out"] == 0.0 and out["grad"] < 1e-5, out
    assert out["gathers"] and all(shape.startswith("s32[") for shape in out["gathers"]), out["gathers"]
