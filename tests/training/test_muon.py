"""``--optimizer muon``: Muon on the hidden linear weights, AdamW on the rest, against a numpy reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from optax.contrib import MuonDimensionNumbers

import deepseek_jax as dsj
from deepseek_jax.training.optimizer import MUON_BETA, MUON_RMS, make_optimizer, muon_dimension_numbers

NS = (3.4445, -4.775, 2.0315)  # optax's quintic Newton-Schulz coefficients


def newton_schulz(m: np.ndarray, steps: int = 5, eps: float = 1e-8) -> np.ndarray:
    """The orthogonalization by hand: the wide orientation, scaled to unit Frobenius norm, then
    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, five times."""
    x = m.T if m.shape[0] > m.shape[1] else m
    x = x / (np.linalg.norm(x) + eps)
    a, b, c = NS
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if m.shape[0] > m.shape[1] else x


def reference(params, grads, lr, wd, b1=0.9, b2=0.95, eps=1e-8):
    """Two steps by hand. Muon (matrix leaves): Nesterov momentum with bias correction, as optax writes it
    (``m_t = b m + (1 - b) g``; direction ``b m_t / (1 - b^(t+1)) + (1 - b) g / (1 - b^t)``), orthogonalized per
    matrix (the stacked leading dim batched), times ``0.2 sqrt(max(fan_in, fan_out))``; Adam for the 1-D leaf.
    Then ``-lr (direction + wd p)`` with weight decay on matrices only."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    beta = MUON_BETA
    for t, g in enumerate(grads, start=1):
        for k in p:
            if k == "scale":
                mu[k] = b1 * mu[k] + (1 - b1) * g[k]
                nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
                d = (mu[k] / (1 - b1 ** t)) / (np.sqrt(nu[k] / (1 - b2 ** t)) + eps)
                p[k] = p[k] - lr * d
                continue
            mu[k] = beta * mu[k] + (1 - beta) * g[k]
            m_hat = beta * mu[k] / (1 - beta ** (t + 1)) + (1 - beta) * g[k] / (1 - beta ** t)
            if k == "kernel":  # [in, out]
                d = newton_schulz(m_hat) * MUON_RMS * np.sqrt(max(m_hat.shape))
            else:  # "stack": [layers, in, out_a, out_b]: each layer's [in, out_a * out_b] on its own
                n, i = m_hat.shape[:2]
                flat = m_hat.reshape(n, i, -1)
                d = np.stack([newton_schulz(x) for x in flat]).reshape(m_hat.shape)
                d = d * MUON_RMS * np.sqrt(max(i, flat.shape[-1]))
            p[k] = p[k] - lr * (d + wd * p[k])
    return p


def test_muon_and_adamw_match_the_numpy_reference():
    rng = np.random.RandomState(0)
    params = {"kernel": rng.normal(size=(6, 4)), "stack": rng.normal(size=(2, 3, 2, 5)), "scale": rng.normal(size=(4,))}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(2)]
    dims = {"kernel": MuonDimensionNumbers((0,), (1,)), "stack": MuonDimensionNumbers((1,), (2, 3)), "scale": None}
    lr, wd = 0.01, 0.1
    tx = make_optimizer(lambda _: lr, weight_decay=wd, clip_norm=0.0, muon_dims=dims)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, p)
        p = {k: p[k] + updates[k] for k in p}
    want = reference(params, grads, lr, wd)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=2e-6, err_msg=k)
    # Orthogonalized: the Muon direction of a [6, 4] matrix has singular values near 1 (the quintic's band), not
    # the gradient's spread.
    s = np.linalg.svd(newton_schulz(grads[0]["kernel"]), compute_uv=False)
    assert 0.6 < s.min() and s.max() < 1.3 and np.ptp(np.linalg.svd(grads[0]["kernel"], compute_uv=False)) > 1


def test_muon_takes_the_hidden_linear_weights_only():
    """On tiny-v3 (layer-stacked runs, expert stacks, MTP): Muon orthogonalizes each kernel's input dims against
    its output dims per layer and per expert; the embedding, head, routers, norms and biases stay on AdamW."""
    from deepseek_jax.models.counts import param_shapes

    config = dsj.presets["tiny-v3"]
    dims = muon_dimension_numbers(config, param_shapes(config))
    assert dims["embed_tokens"]["embedding"] is None and dims["lm_head"]["kernel"] is None
    moe = dims["moe_layers"]
    assert moe["mlp"]["gate"]["kernel"] is None and moe["mlp"]["gate"]["e_score_correction_bias"] is None
    assert moe["input_layernorm"]["scale"] is None
    assert moe["self_attn"]["q_b_proj"]["kernel"] == MuonDimensionNumbers((1,), (2, 3))  # [L, q_lora, H, qk]
    assert moe["self_attn"]["o_proj"]["kernel"] == MuonDimensionNumbers((1, 2), (3,))  # [L, H, V, D]
    assert moe["mlp"]["experts"]["gate_proj"] == MuonDimensionNumbers((2,), (3,))  # [L, E, D, I]
    assert dims["mtp_0"]["eh_proj"]["kernel"] == MuonDimensionNumbers((0,), (1,))


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v4"])
def test_train_with_muon_lowers_the_loss(preset):
    """A few steps of ``TrainConfig(optimizer="muon")`` on a fixed batch: the loss falls (V4 was pre-trained with
    Muon); V4's hash table stays as it was."""
    import train_helpers as th

    from deepseek_jax.parallel.mesh import make_mesh
    from deepseek_jax.training.config import TrainConfig
    from deepseek_jax.training.trainer import Trainer

    config = dsj.presets[preset].replace(num_hidden_layers=2) if preset == "tiny-v3" else dsj.presets[preset]
    tc = TrainConfig(batch_size=8, seq_len=16, learning_rate=1e-2, warmup_steps=0, optimizer="muon")
    trainer = Trainer(config, tc, make_mesh(None))
    state = trainer.init_state()
    table = np.asarray(state["params"]["hash_hca_0"]["mlp"]["gate"]["tid2eid"]) if preset == "tiny-v4" else None
    batch = trainer.put_batch(th.batch(0))
    losses = []
    for _ in range(5):
        state, metrics = trainer.run_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    if table is not None:
        np.testing.assert_array_equal(np.asarray(state["params"]["hash_hca_0"]["mlp"]["gate"]["tid2eid"]), table)
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        TrainConfig(optimizer="sgd")
