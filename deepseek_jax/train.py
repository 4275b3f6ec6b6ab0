"""Sharded training: state, the jitted train step, the balancing bias update, Orbax checkpoints, the loop.

The step is ``jax.jit`` with explicit in/out shardings (from the logical-axis rules in ``sharding.py``) and
the state donated. The same code runs on one CPU, simulated CPU devices, a GPU, and several processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from functools import partial
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import losses
from .config import ModelConfig
from .model import Transformer
from .optimizer import learning_rate_schedule, make_optimizer, trainable_by_patterns
from .options import ModelOptions
from .sharding import batch_sharding, logical_rules, mesh_context, param_shardings, replicated

PRECISIONS = ("fp32", "bf16", "fp8")
V3_SEQUENCE_BALANCE_ALPHA = 1e-4  # DeepSeek-V3 report, section 4.2
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a run (the architecture is the ``ModelConfig``)."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1
    mtp_weight: float = 0.3  # lambda of L_MTP (DeepSeek-V3: 0.3 early, 0.1 later)
    balance_alpha: Optional[float] = None  # None: see balance_alpha_for
    bias_update_rate: float = 0.001  # gamma of the aux-loss-free bias update
    z_loss_weight: float = 0.0
    bf16_moments: bool = False
    fsdp_over_data: bool = False  # shard weights and optimizer state over `data` too (ZeRO-3), not just fsdp x expert
    precision: str = "fp32"
    remat: str = "none"
    max_bad_steps: int = 5  # consecutive non-finite steps (each skipped) that stop the run
    moe_dispatch: str = "auto"  # ModelOptions.moe_dispatch
    capacity_factor: Optional[float] = None  # ModelOptions.capacity_factor (None: dropless)
    moe_keep_received: bool = False  # ModelOptions.moe_keep_received
    attention: str = "auto"  # ModelOptions.attention
    attention_block: int = 512  # ModelOptions.attention_block
    train_only: tuple[str, ...] = ()  # globs over '/'-joined param paths: only these are updated (all if empty)
    freeze: tuple[str, ...] = ()  # globs of params that are never updated
    seed: int = 0

    def __post_init__(self):
        for name in ("train_only", "freeze"):  # JSON round trips give lists
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {PRECISIONS}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")

    def balance_alpha_for(self, config: ModelConfig) -> float:
        """The balance-loss weight alpha: ``balance_alpha`` when set; otherwise, for aux-loss-free (``noaux_tc``)
        models, DeepSeek-V3's paper value 0.0001 (section 4.2: the sequence-wise loss is only a safeguard next
        to the bias update; the released config.json's ``aux_loss_alpha: 0.001`` is a field V3's own code
        never reads), and for V2-style routers their config's ``aux_loss_alpha`` (0.001 V2-Lite, 0.003 V2)."""
        if self.balance_alpha is not None:
            return self.balance_alpha
        return V3_SEQUENCE_BALANCE_ALPHA if config.topk_method == "noaux_tc" else config.aux_loss_alpha

    def model_options(self) -> ModelOptions:
        """fp32: everything fp32. bf16: fp32 master weights, bf16 compute. fp8: bf16 compute with DeepSeek's
        E4M3 tile/block recipe on every linear layer's GEMMs."""
        dtype = "float32" if self.precision == "fp32" else "bfloat16"
        matmul = "fp8" if self.precision == "fp8" else "default"
        return ModelOptions(dtype=dtype, param_dtype="float32", remat=self.remat, matmul=matmul,
                            moe_dispatch=self.moe_dispatch, capacity_factor=self.capacity_factor,
                            moe_keep_received=self.moe_keep_received, attention=self.attention,
                            attention_block=self.attention_block)


class Trainer:
    """Builds the sharded state and the jitted step for one (config, train config, mesh).

    Subclasses (``distill.DistillTrainer``, ``grpo.GRPOTrainer``) change the objective (``_objective``) and the
    batch's keys (``batch_keys``, ``batch_ndims``); sharding, jit, donation, grad accumulation, clipping,
    skipped non-finite steps and the balancing stay here."""

    batch_keys: tuple[str, ...] = BATCH_KEYS
    batch_ndims: dict = {}  # key -> rank, for batch entries that are not [B, T]

    def __init__(self, config: ModelConfig, tc: TrainConfig, mesh: jax.sharding.Mesh):
        self.config, self.tc, self.mesh = config, tc, mesh
        # The backend the step compiles for picks the MoE dispatch (ragged on TPU): the mesh's, not JAX's
        # default backend (`deepseek-jax plan` compiles TPU meshes on a CPU machine).
        platform = mesh.devices.flat[0].platform if isinstance(mesh, jax.sharding.Mesh) else None
        self.model = Transformer(config, dataclasses.replace(tc.model_options(), platform=platform))
        self.schedule = learning_rate_schedule(tc.learning_rate, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
        self.alpha = tc.balance_alpha_for(config)
        dummy = jnp.zeros((1, 2), jnp.int32)
        boxed = jax.eval_shape(self.model.init, jax.random.PRNGKey(0), dummy)["params"]
        # Frozen params (--train-only / --freeze, and the MTP modules when their loss is off, so that weight
        # decay does not shrink what no loss trains) get exactly zero updates.
        freeze = tc.freeze + (("mtp_*",) if config.num_nextn_predict_layers and not tc.mtp_weight else ())
        self.trainable = None
        if tc.train_only or freeze:
            self.trainable = trainable_by_patterns(nn.meta.unbox(boxed), tc.train_only, freeze)
        self.optimizer = make_optimizer(self.schedule, weight_decay=tc.weight_decay, b1=tc.b1, b2=tc.b2,
                                        eps=tc.eps, clip_norm=tc.clip_norm, bf16_moments=tc.bf16_moments,
                                        trainable=None if self.trainable is None else lambda _: self.trainable)
        self.rules = logical_rules(tc.fsdp_over_data)
        self.param_shardings = param_shardings(boxed, mesh, self.rules)
        self._dummy = dummy
        self.batch_sharding = batch_sharding(mesh)
        self._step = None

    # ----- state ------------------------------------------------------------------------------------
    def init_state(self, seed: Optional[int] = None) -> dict:
        """Fresh params (created directly in their shards) and optimizer state."""
        rng = jax.random.PRNGKey(self.tc.seed if seed is None else seed)
        init = jax.jit(lambda r: nn.meta.unbox(self.model.init(r, self._dummy)["params"]),
                       out_shardings=self.param_shardings)
        return self.state_from_params(init(rng))

    def state_from_params(self, params) -> dict:
        params = jax.device_put(params, self.param_shardings)
        opt_shardings = self._mirror_param_shardings(jax.eval_shape(self.optimizer.init, params))
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated(self.mesh))
        return {"step": step, "params": params, "opt_state": opt_state}

    def trainable_count(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (the router's correction bias, set by the balancing rule,
        counts as trainable when the patterns leave it so)."""
        shapes = jax.eval_shape(lambda r: nn.meta.unbox(self.model.init(r, self._dummy)["params"]),
                                jax.random.PRNGKey(0))
        sizes = [math.prod(x.shape) for x in jax.tree.leaves(shapes)]
        flags = jax.tree.leaves(self.trainable) if self.trainable is not None else [True] * len(sizes)
        return sum(n for n, t in zip(sizes, flags) if t), sum(sizes)

    def _is_trainable(self, *path: str) -> bool:
        node = self.trainable
        if node is None:
            return True
        for k in path:
            node = node[k]
        return bool(node)

    def state_shardings(self, state) -> Any:
        return jax.tree.map(lambda x: x.sharding, state)

    def abstract_state(self) -> Any:
        """ShapeDtypeStructs with shardings, for restoring a checkpoint straight into its shards."""
        params = jax.eval_shape(lambda r: nn.meta.unbox(self.model.init(r, self._dummy)["params"]),
                                jax.random.PRNGKey(0))
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                 "opt_state": jax.eval_shape(self.optimizer.init, params)}
        shard = self._mirror_param_shardings(state)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shard)

    def _mirror_param_shardings(self, tree):
        """Shardings for a tree holding params-shaped subtrees (the train state, Adam's moments): a leaf whose
        path ends with a param's path takes that param's sharding; everything else (counts, step) is
        replicated."""
        by_path = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(self.param_shardings)}
        rep = replicated(self.mesh)

        def pick(path, x):
            key = jax.tree_util.keystr(path)
            matches = [p for p in by_path if key.endswith(p)]
            return by_path[max(matches, key=len)] if matches and x.ndim else rep

        return jax.tree_util.tree_map_with_path(pick, tree)

    # ----- the step ---------------------------------------------------------------------------------
    def _objective(self, logits, batch, norm) -> tuple[jax.Array, dict]:
        """The main loss term from the model's logits (next-token CE here) and its metrics; every sum divides
        by ``norm``'s global counts, so micro-batch values add up to the batch's."""
        ce_sum, n = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])
        ce = ce_sum / jnp.maximum(norm["tokens"], 1.0)
        return ce, {"loss": ce, "tokens": n}

    def _loss(self, params, batch, norm=None):
        """The total loss of (a micro-batch of) the batch; ``norm`` (``losses.loss_normalizers`` of the whole
        global batch, default this batch's) holds the counts every sum is divided by, so micro-batch losses
        add up to the batch's."""
        c, tc = self.config, self.tc
        if norm is None:
            norm = losses.loss_normalizers(batch, c.num_nextn_predict_layers)
        mtp_on = c.num_nextn_predict_layers > 0 and tc.mtp_weight > 0
        with nn.logical_axis_rules(self.rules):
            logits, aux = self.model.apply(
                {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                return_mtp=mtp_on, return_router_stats=True,
            )
        mask = batch["loss_mask"]
        n_tokens = jnp.maximum(norm["tokens"], 1.0)
        objective, objective_parts = self._objective(logits, batch, norm)
        mtp = losses.mtp_loss(aux.get("mtp_logits", []), batch["targets"], mask, batch["segment_ids"],
                              tc.mtp_weight, norm["mtp_tokens"]) if mtp_on else jnp.zeros((), jnp.float32)
        stats = aux["router_stats"]
        mtp_stats = aux.get("mtp_router_stats", {})
        # The expert-level (V2, batch-wise) loss is not a sum over sequences: under accumulation it is each
        # micro-batch's own, averaged over the micro-batches.
        per_micro = 1.0 if c.seq_aux else 1.0 / norm.get("micro_batches", 1)
        balance = per_micro * losses.balance_loss(stats, c, self.alpha, c.seq_aux, norm["sequences"])
        if mtp_stats:
            balance = balance + per_micro * losses.balance_loss(mtp_stats, c, self.alpha, c.seq_aux,
                                                                norm["mtp_sequences"])
        z = jnp.zeros((), jnp.float32)
        if tc.z_loss_weight:
            z_sum, _ = losses.z_loss(logits, mask)
            z = tc.z_loss_weight * z_sum / n_tokens
        total = objective + mtp + balance + z
        counts = {
            "moe": stats["counts"].sum(1) if stats else jnp.zeros((0, 1)),
            "mtp": mtp_stats["counts"].sum(1) if mtp_stats else jnp.zeros((0, 1)),
        }
        dropped = sum((s["dropped"].sum() for s in (stats, mtp_stats) if s), jnp.zeros((), jnp.int32))
        parts = {**objective_parts, "mtp_loss": mtp, "balance_loss": balance, "z_loss": z, "total_loss": total,
                 "input_tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32),
                 "moe_dropped": dropped.astype(jnp.float32)}
        return total, (parts, counts)

    def _grads(self, params, batch):
        """Gradients of the global batch's loss, summed over ``grad_accum`` micro-batches (a scan); every term
        divides by the global batch's counts, so this equals one big batch whatever the padding."""
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        norm = losses.loss_normalizers(batch, self.config.num_nextn_predict_layers)
        k = self.tc.grad_accum
        norm["micro_batches"] = k
        # Each gradient in its param's shards: the data-parallel sum then lowers to a reduce-scatter (not an
        # all-reduce of the whole weight followed by a slice).
        shard = partial(jax.lax.with_sharding_constraint, shardings=self.param_shardings)
        if k == 1:
            (_, aux), grads = grad_fn(params, batch, norm)
            return shard(grads), aux
        micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

        def body(acc, mb):
            (_, aux), g = grad_fn(params, mb, norm)
            return jax.tree.map(jnp.add, acc, (shard(g), aux)), None

        zero_g = shard(jax.tree.map(jnp.zeros_like, params))
        zero_aux = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), norm)[0][1])
        zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_aux)
        (grads, aux), _ = jax.lax.scan(body, (zero_g, zero_aux), micro)
        return grads, aux

    def _update_biases(self, params, counts):
        """The aux-loss-free bias update from the global batch's expert loads, after the optimizer step."""
        c, gamma = self.config, self.tc.bias_update_rate
        if not c.has_correction_bias or gamma == 0:
            return params
        params = dict(params)
        offset = 0
        for name, _, length in c.layer_runs:
            if not name.startswith("moe"):
                continue
            if not self._is_trainable(name, "mlp", "gate", "e_score_correction_bias"):
                offset += length
                continue
            run = params[name]
            gate = run["mlp"]["gate"]
            new_bias = losses.update_correction_bias(gate["e_score_correction_bias"],
                                                     counts["moe"][offset: offset + length], gamma)
            params[name] = {**run, "mlp": {**run["mlp"], "gate": {**gate, "e_score_correction_bias": new_bias}}}
            offset += length
        for k in range(counts["mtp"].shape[0]):
            name = f"mtp_{k}"
            if not self._is_trainable(name, "block", "mlp", "gate", "e_score_correction_bias"):
                continue
            blk = params[name]["block"]
            gate = blk["mlp"]["gate"]
            new_bias = losses.update_correction_bias(gate["e_score_correction_bias"], counts["mtp"][k], gamma)
            params[name] = {**params[name], "block": {**blk, "mlp": {**blk["mlp"], "gate": {
                **gate, "e_score_correction_bias": new_bias}}}}
        return params

    def _train_step(self, state, batch):
        grads, (parts, counts) = self._grads(state["params"], batch)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = self._update_biases(params, counts)
        grad_norm = optax.global_norm(grads)
        # A non-finite loss or gradient skips the update: params and optimizer state stay as they were.
        ok = jnp.isfinite(parts["total_loss"]) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), (params, opt_state),
                                         (state["params"], state["opt_state"]))
        metrics = dict(parts)
        metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = self.schedule(state["step"])
        if counts["moe"].shape[0]:
            load = counts["moe"]
            metrics["expert_load_max_over_mean"] = load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    def step_fn(self, state) -> Callable:
        """The jitted step ``(state, batch) -> (state, metrics)`` with explicit shardings, state donated."""
        if self._step is None:
            shard = self.state_shardings(state)
            self._step = jax.jit(self._train_step, in_shardings=(shard, self.batch_shardings()),
                                 out_shardings=(shard, replicated(self.mesh)), donate_argnums=(0,))
        return self._step

    def run_step(self, state, batch):
        with mesh_context(self.mesh, self.rules):
            return self.step_fn(state)(state, batch)

    def batch_shardings(self) -> dict:
        """Every batch entry over the batch axes (dim 0; dim 1 over the context axis when it is > 1)."""
        return {k: batch_sharding(self.mesh, self.batch_ndims.get(k, 2)) for k in self.batch_keys}

    def put_batch(self, local_batch: dict) -> dict:
        """This process's rows of the global batch -> global arrays sharded over the batch axes."""
        out = {}
        for k, sharding in self.batch_shardings().items():
            x = np.asarray(local_batch[k])
            if jax.process_count() == 1:
                out[k] = jax.device_put(x, sharding)
            else:
                out[k] = jax.make_array_from_process_local_data(sharding, x)
        return out

    # ----- accounting -------------------------------------------------------------------------------
    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 x active params (routed experts at K/E) + causal attention."""
        from .info import flops_per_token

        mtp = self.config.num_nextn_predict_layers > 0 and self.tc.mtp_weight > 0
        return flops_per_token(self.config, self.tc.seq_len / 2, train=True, mtp=mtp)


# Dense bf16 peak FLOP/s per chip from the vendors' data sheets, for the MFU estimate, matched in order against
# the lower-cased ``device_kind`` (the first match wins, so the variants come before their family).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12),      # Trillium
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),      # v5e reports itself as "TPU v5 lite"
    ("tpu v5p", 459e12), ("tpu v5", 459e12),           # v5p reports itself as "TPU v5"
    ("tpu v4", 275e12),
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989e12),   # plain "H100 80GB HBM3" is the SXM part
    ("h200", 989e12), ("gh200", 989e12),
    ("a100", 312e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one chip of ``device_kind`` (None: unknown, MFU not reported)."""
    kind = device_kind.lower()
    return next((flops for name, flops in PEAK_FLOPS if name in kind), None)


def peak_flops_per_device() -> Optional[float]:
    return peak_flops(jax.devices()[0].device_kind)


# ----- checkpoints --------------------------------------------------------------------------------
class Checkpointer:
    """Orbax ``CheckpointManager``: async saves every ``every`` steps, keeps ``keep``; the train state plus a
    JSON record (data position, RNG seed, step). Orbax writes each step into a temporary directory and
    renames it when complete, so a save interrupted by a crash is never listed as the latest step."""

    def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        ocp = self._ocp
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state):
        ocp = self._ocp
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                  meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def metrics_to_host(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(jax.device_get(v))
        out[k] = v.tolist() if v.ndim else float(v)
    return out


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path`` (written beside it, then renamed); only by process 0."""
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def log_line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))


def mfu(flops_per_token: float, tokens_per_s: float) -> Optional[float]:
    peak = peak_flops_per_device()
    if peak is None:
        return None
    return flops_per_token * tokens_per_s / (peak * jax.device_count())




# ----- the loop -----------------------------------------------------------------------------------
def fit(config: ModelConfig, tc: TrainConfig, workdir: str, *, mesh_spec: Optional[str] = None,
        data: Optional[str] = None, tokenizer=None, eos_id: Optional[int] = None, arithmetic_loss: str = "all",
        save_every: int = 100, keep: int = 3, resume: bool = True, progress: bool = True, async_save: bool = True,
        stop_after: Optional[int] = None, init_from: Optional[str] = None, chat_style: str = "v3") -> list[dict]:
    """Train (or resume) in ``workdir``: checkpoints in ``workdir/checkpoints``, metrics in
    ``workdir/metrics.jsonl`` and TensorBoard events in ``workdir/tb``, the loss curve in ``workdir/loss.png``.
    Returns this call's per-step metric records. ``stop_after`` ends early after that many steps (tests).
    ``arithmetic_loss``: on the built-in data, "all" tokens or only the "answers" count in the loss.
    ``init_from``: start from this checkpoint's weights (``init_params``; ``config`` must be its config, see
    ``checkpoint.pretrained_config``) instead of a random init; a checkpoint of this work directory, when there
    is one, still wins (the run resumes). ``chat_style``: the template chat ``.jsonl`` data is rendered with."""
    from .data import make_dataset
    from .sharding import make_mesh

    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(mesh_spec)
    trainer = Trainer(config, tc, mesh)
    dataset = make_dataset(data, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed, tokenizer=tokenizer,
                           eos_id=eos_id, process_index=jax.process_index(), process_count=jax.process_count(),
                           arithmetic_loss=arithmetic_loss, chat_style=chat_style)
    if dataset.vocab_size > config.vocab_size:
        raise ValueError(f"the data's vocabulary has {dataset.vocab_size} ids but the model's vocab_size is "
                         f"{config.vocab_size}; set vocab_size >= {dataset.vocab_size}")
    if jax.process_index() == 0:  # prompts for `deepseek-jax generate --checkpoint WORKDIR` use this vocabulary
        from .data import arithmetic_tokenizer

        if tokenizer is not None:
            tokenizer.save(os.path.join(workdir, "tokenizer.json"))
        elif data in (None, "arithmetic"):
            arithmetic_tokenizer().save(os.path.join(workdir, "tokenizer.json"))
    fresh = (lambda: trainer.state_from_params(init_params(init_from, trainer))) if init_from is not None \
        else trainer.init_state
    ckpt, start, state = start_or_resume(workdir, trainer, dataset, fresh, resume=resume, save_every=save_every,
                                         keep=keep, async_save=async_save)
    flops = trainer.flops_per_token()

    def step_fn(state, step):
        state, metrics = trainer.run_step(state, trainer.put_batch(next(dataset)))
        return state, metrics_to_host(metrics)

    def postfix(m, first):
        return dict(loss=f"{m['loss']:.3f}", mtp=f"{m['mtp_loss']:.3f}",
                    tok_s="-" if first else f"{m['tokens_per_s']:.0f}")

    return run_loop(workdir, ckpt, state, start, tc.steps if stop_after is None else min(tc.steps, start + stop_after),
                    tc.steps, step_fn, dataset.state, seed=tc.seed, max_bad_steps=tc.max_bad_steps, flops=flops,
                    progress=progress, desc="train", postfix=postfix)


def start_or_resume(workdir: str, trainer: Trainer, data, fresh: Callable[[], dict], *, resume: bool,
                    save_every: int, keep: int, async_save: bool = True) -> tuple["Checkpointer", int, dict]:
    """The run's ``Checkpointer`` (``workdir/checkpoints``) and where the run starts: the latest checkpoint when
    ``resume`` finds one (its data position restored into ``data``, which has ``restore(state)``), else step 0
    with ``fresh()``'s state."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=save_every, keep=keep, async_save=async_save)
    start = ckpt.latest_step() if resume else None
    if start is None:
        return ckpt, 0, fresh()
    state, meta = ckpt.restore(start, trainer.abstract_state())
    data.restore(meta["data"])
    return ckpt, start, state


def run_loop(workdir: str, ckpt: "Checkpointer", state, start: int, end: int, total: int,
             step_fn: Callable[[Any, int], tuple[Any, dict]], data_state: Callable[[], dict], *, seed: int,
             max_bad_steps: int, progress: bool = True, desc: str = "train",
             postfix: Optional[Callable[[dict, bool], dict]] = None, flops: Optional[float] = None,
             plot: Callable[[list, str], None] = None) -> list[dict]:
    """The loop shared by ``train``, ``distill`` and ``grpo``: steps ``start..end-1`` of ``total``, each
    ``step_fn(state, step) -> (state, host metrics)``; a progress bar (``postfix(metrics, first_step)``), one JSON
    line per step in ``workdir/metrics.jsonl`` (records past ``start`` from an earlier run are dropped) and
    TensorBoard scalars in ``workdir/tb``; a checkpoint every ``ckpt``'s interval and at ``total`` with
    ``data_state()`` and the seed; a stop after ``max_bad_steps`` skipped (non-finite) steps in a row; the curve
    (``plot``, default ``plot_loss_curve``) in ``workdir/loss.png`` at the end. Closes ``ckpt``."""
    from tqdm import tqdm

    plot = plot_loss_curve if plot is None else plot
    main = jax.process_index() == 0
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    history = _read_history(metrics_path, upto=start) if main else []
    writer = None
    records = []
    try:
        if main:
            _rewrite_history(metrics_path, history)
            from tensorboardX import SummaryWriter
            writer = SummaryWriter(os.path.join(workdir, "tb"))
        bar = tqdm(range(start, end), initial=start, total=total, desc=desc, disable=not (progress and main),
                   dynamic_ncols=True)
        t_last = time.perf_counter()
        bad_run = 0
        for step in bar:
            state, m = step_fn(state, step)
            t = time.perf_counter()
            m["step"] = step + 1
            # Real (non-padding) tokens over the step's wall time; the first step of a process compiles, so
            # it has no rate.
            first = step == start
            if "input_tokens" in m:
                m["tokens_per_s"] = None if first else m["input_tokens"] / max(t - t_last, 1e-9)
                if flops is not None:
                    m["mfu"] = None if first else mfu(flops, m["tokens_per_s"])
            t_last = t
            records.append(m)
            if main:
                with open(metrics_path, "a") as f:
                    f.write(log_line(m) + "\n")
                for k, v in m.items():
                    if isinstance(v, float):
                        writer.add_scalar(f"{desc}/{k}", v, step + 1)
                if postfix is not None:
                    bar.set_postfix(**postfix(m, first))
            bad_run = bad_run + 1 if m.get("skipped") else 0
            if bad_run >= max_bad_steps:
                raise FloatingPointError(
                    f"step {step + 1}: {bad_run} steps in a row had a non-finite loss or gradient (loss "
                    f"{m.get('total_loss')}, grad norm {m.get('grad_norm')}); their updates were skipped and the "
                    f"run stops. The last good checkpoint is step {ckpt.latest_step()} in "
                    f"{os.path.join(workdir, 'checkpoints')}")
            ckpt.save(step + 1, state, {"data": data_state(), "seed": seed, "step": step + 1},
                      force=(step + 1 == total))
    finally:
        ckpt.close()
        if writer is not None:
            writer.close()
    if main:
        plot(_read_history(metrics_path), os.path.join(workdir, "loss.png"))
    return records


def init_params(path: str, trainer: Trainer):
    """The params of checkpoint ``path`` (HF safetensors, FP8 included; a converted Orbax directory; a train work
    directory) in fp32 master precision, placed straight into ``trainer``'s shardings: HF and converted
    directories are read shard by shard (``load_pretrained(..., mesh=)``), never whole on a host. The
    checkpoint's config must be ``trainer.config``."""
    from .checkpoint import load_pretrained
    from .convert.load import is_converted_dir

    if is_train_workdir(path):
        config, params = load_train_checkpoint(path)
    elif is_converted_dir(path):
        config, params = load_pretrained(path, dtype=jnp.float32, mesh=trainer.mesh)
    else:
        config, params = load_pretrained(path, dtype=jnp.float32, shardings=trainer.param_shardings)
    if config != trainer.config:
        diff = [f"{f.name}: checkpoint {getattr(config, f.name)!r}, run {getattr(trainer.config, f.name)!r}"
                for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(trainer.config, f.name)]
        raise ValueError(f"{path}: the checkpoint's config differs from the run's ({'; '.join(diff)}); "
                         f"fine-tuning keeps the checkpoint's architecture")
    return jax.device_put(params, trainer.param_shardings)


def evaluate_arithmetic(config: ModelConfig, params, *, seed: int = 12345, batches: int = 4, batch_size: int = 32,
                        seq_len: int = 128, samples: int = 6, options: ModelOptions = ModelOptions()) -> dict:
    """How well a model trained on the built-in data does arithmetic, on documents drawn with another seed.

    ``exact``: the fraction of held-out answers that greedy decoding gets entirely right (every digit and the
    line end; ``data.arithmetic_exact_accuracy`` over ``batches`` batches, ``answers`` of them scored).
    ``samples``: a few ``(question, model's greedy answer, right answer)`` strings, each question asked alone
    after BOS.
    """
    from .data import BOS_ID, _CHAR_TO_ID, _NEWLINE_ID, arithmetic_exact_accuracy, arithmetic_text, decode, \
        make_dataset

    model = Transformer(config, options)
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    held_out = make_dataset(None, seq_len=seq_len, batch_size=batch_size, seed=seed)
    right = scored = 0
    for _ in range(batches):
        b = next(held_out)
        acc, n = arithmetic_exact_accuracy(apply(params, b["inputs"], b["positions"], b["segment_ids"]), b)
        right, scored = right + (acc * n if n else 0), scored + n
    lines = [line for doc in arithmetic_text(seed + 1, num_documents=samples) for line in doc.splitlines()]
    lines = lines[:samples]
    questions = [line[: line.index("=") + 1] for line in lines]
    width = max(len(q) for q in questions) + 1 + 5  # BOS, the question, an answer of up to 4 digits and "\n"
    tokens = np.zeros((len(questions), width), np.int32)
    for i, q in enumerate(questions):
        tokens[i, : len(q) + 1] = [BOS_ID] + [_CHAR_TO_ID[ch] for ch in q]
    at = np.array([len(q) + 1 for q in questions])
    done = np.zeros(len(questions), bool)
    for _ in range(5):  # greedy, one fixed-shape forward per new character (causal: padding is never seen)
        logits = np.asarray(apply(params, jnp.asarray(tokens)))
        nxt = logits[np.arange(len(questions)), at - 1].argmax(-1)
        for i in np.flatnonzero(~done & (at < width)):
            tokens[i, at[i]] = nxt[i]
            done[i] = nxt[i] == _NEWLINE_ID
            at[i] += 1
    answers = [decode(tokens[i, len(q) + 1: at[i]]).rstrip("\n") for i, q in enumerate(questions)]
    return {"exact": right / max(scored, 1), "answers": scored,
            "samples": [(q, a, line[len(q):]) for q, a, line in zip(questions, answers, lines)]}


def _read_history(path: str, upto: Optional[int] = None) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if upto is None or r["step"] <= upto]


def _rewrite_history(path: str, rows: list[dict]) -> None:
    """On resume, drop records past the restored step (they will be recomputed)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(log_line(r) + "\n")
    os.replace(tmp, path)


def plot_loss_curve(rows: list[dict], path: str) -> None:
    if not rows:
        return
    # A bare Figure (no pyplot): drawing to a file leaves the caller's backend alone (a notebook's inline one).
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, [r["loss"] for r in rows], label="next-token CE")
    if any(r.get("mtp_loss") for r in rows):
        ax.plot(steps, [r["mtp_loss"] for r in rows], label="MTP loss (weighted)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def is_train_workdir(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, f)) for f in ("config.json", "train_config.json", "checkpoints"))


def load_train_checkpoint(workdir: str, step: Optional[int] = None):
    """``(config, params)`` from a ``deepseek-jax train`` work directory (its latest checkpoint by default)."""
    from .sharding import make_mesh

    config = ModelConfig.from_pretrained(workdir)
    with open(os.path.join(workdir, "train_config.json")) as f:
        tc = TrainConfig(**json.load(f))
    trainer = Trainer(config, tc, make_mesh(None, jax.devices()[:1]))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=1 << 30, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir}/checkpoints: no finished checkpoint to load")
        state, _ = ckpt.restore(step, trainer.abstract_state())
    finally:
        ckpt.close()
    return config, state["params"]
