"""The trainer: the sharded train state and the jitted train step for one (config, train config, mesh).

The step is ``jax.jit`` with explicit in/out shardings (from the logical-axis rules in ``parallel/rules.py``) and
the state donated. The same code runs on one CPU, simulated CPU devices, a GPU, and several processes.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.layers.lora import DROPOUT_RNG, adapters_only, combine, is_adapter_path, without_adapters
from deepseek_jax.models.counts import batch_flops, causal_selected
from deepseek_jax.models.transformer import Transformer, abstract_params
from deepseek_jax.parallel.mesh import mesh_context, wait_for_processes
from deepseek_jax.parallel.rules import (
    batch_sharding,
    logical_rules,
    param_shardings,
    process_rows,
    replicated,
)
from deepseek_jax.quant.weights import with_fp8_shardings
from deepseek_jax.training import losses
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.optimizer import (
    learning_rate_schedule,
    make_optimizer,
    muon_dimension_numbers,
    param_path,
    trainable_by_patterns,
)

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


class Trainer:
    """Builds the sharded state and the jitted step for one (config, train config, mesh).

    Subclasses (``posttrain``'s ``DistillTrainer``, ``GRPOTrainer``) change the objective (``_objective``) and the
    batch's keys (``batch_keys``, ``batch_ndims``); sharding, jit, donation, grad accumulation, clipping,
    skipped non-finite steps and the balancing stay here."""

    batch_keys: tuple[str, ...] = BATCH_KEYS
    batch_ndims: dict = {}  # key -> rank, for batch entries that are not [B, T]

    def __init__(self, config: ModelConfig, tc: TrainConfig, mesh: jax.sharding.Mesh, updates_per_step: int = 1):
        """``updates_per_step``: optimizer updates per run step (GRPO's iterations); the learning-rate schedule,
        which counts updates, spans ``tc.steps`` x that, warmup included."""
        self.config, self.tc, self.mesh = config, tc, mesh
        # The backend the step compiles for picks the MoE dispatch (ragged on TPU): the mesh's, not JAX's
        # default backend (`deepseek-jax plan` compiles TPU meshes on a CPU machine).
        platform = mesh.devices.flat[0].platform if isinstance(mesh, jax.sharding.Mesh) else None
        self.model = Transformer(config, dataclasses.replace(tc.model_options(), platform=platform))
        self.schedule = learning_rate_schedule(tc.learning_rate, tc.warmup_steps * updates_per_step,
                                               tc.steps * updates_per_step, tc.min_lr_ratio)
        self.alpha = tc.balance_alpha_for(config)
        dummy = jnp.zeros((1, 2), jnp.int32)
        boxed = abstract_params(config, self.model.options)
        # Frozen params (--train-only / --freeze, and the MTP modules when their loss is off, so that weight
        # decay does not shrink what no loss trains) get exactly zero updates.
        freeze = tc.freeze + (("mtp_*",) if config.mtp_modules and not tc.mtp_weight else ())
        train_only = tc.train_only
        if tc.indexer_stage is not None:
            if not config.has_indexer:
                raise ValueError(f"indexer_stage={tc.indexer_stage!r}: this {config.model_type} model has no "
                                 "lightning indexer (DeepSeek-V3.2, model_type deepseek_v32)")
            if tc.indexer_stage == "warmup" and not train_only:
                train_only = ("*/indexer/*",)  # the dense warm-up trains the indexer alone
        self.lora = self.model.options.lora
        if self.lora is not None:  # only the adapters train
            paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed))]
            if not any(is_adapter_path(p) for p in paths):
                raise ValueError(f"--lora-targets {' '.join(self.lora.targets)}: no linear layer matches; the "
                                 f"kernels' paths (without '/kernel') look like "
                                 f"{', '.join(repr(p) for p in paths if p.endswith('_proj/kernel'))[:300]}")
            train_only = ("*lora_a", "*lora_b")
        self.trainable = None
        if train_only or freeze:
            self.trainable = trainable_by_patterns(nn.meta.unbox(boxed), train_only, freeze)
        self.optimizer = make_optimizer(self.schedule, weight_decay=tc.weight_decay, b1=tc.b1, b2=tc.b2,
                                        eps=tc.eps, clip_norm=tc.clip_norm, bf16_moments=tc.bf16_moments,
                                        trainable=None if self.trainable is None else lambda _: self.trainable,
                                        muon_dims=(muon_dimension_numbers(config, nn.meta.unbox(boxed))
                                                   if tc.optimizer == "muon" else None))
        self.rules = logical_rules(tc.fsdp_over_data)
        self.param_shardings = param_shardings(boxed, mesh, self.rules)
        self._dummy = dummy
        self.batch_sharding = batch_sharding(mesh)
        self._step = None
        self._compiled_everywhere = False

    # ----- state ------------------------------------------------------------------------------------
    def init_state(self, seed: Optional[int] = None) -> dict:
        """Fresh params (created directly in their shards) and optimizer state."""
        rng = jax.random.PRNGKey(self.tc.seed if seed is None else seed)
        init = jax.jit(lambda r: nn.meta.unbox(self.model.init(r, self._dummy)["params"]),
                       out_shardings=self.param_shardings)
        return self.state_from_params(init(rng))

    def state_from_params(self, params, adapters: Optional[dict] = None) -> dict:
        """The train state from ``params`` (with LoRA, a base without adapters gets fresh ones). ``adapters``
        (``checkpoint/adapters.py``'s ``read_peft_adapter``): ``path -> (values, provided)``; the entries a PEFT
        adapter provides replace the fresh ones (the others keep their fresh A and zero B)."""
        if self.lora is not None and not any(is_adapter_path(param_path(p))
                                             for p, _ in jax.tree_util.tree_leaves_with_path(params)):
            params = self._with_fresh_adapters(params)
        for path, (values, provided) in (adapters or {}).items():
            *parents, leaf = path.split("/")
            node = params = dict(params)
            for k in parents:
                node[k] = dict(node[k])
                node = node[k]
            if leaf not in node or tuple(node[leaf].shape) != values.shape:
                raise ValueError(f"adapter {path}: shape {values.shape}, the run's is "
                                 f"{tuple(node[leaf].shape) if leaf in node else 'absent'}")
            mask = provided.reshape(provided.shape + (1,) * (values.ndim - provided.ndim))
            node[leaf] = np.where(mask, values, np.asarray(jax.device_get(node[leaf])))
        params = jax.device_put(params, with_fp8_shardings(self.param_shardings, params))  # QLoRA: FP8 kept
        opt_shardings = self._mirror_param_shardings(jax.eval_shape(self.optimizer.init, params))
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated(self.mesh))
        return {"step": step, "params": params, "opt_state": opt_state}

    def _with_fresh_adapters(self, base):
        """``base`` (a params tree without adapters) with the adapters of a fresh init (``tc.seed``), created
        in their shards; the base's own init is dead code, which XLA drops."""
        def adapters(rng):
            full = nn.meta.unbox(self.model.init(rng, self._dummy)["params"])
            return jax.tree_util.tree_map_with_path(
                lambda p, x: x if is_adapter_path(param_path(p)) else None, full)

        fresh = jax.jit(adapters, out_shardings=self.param_shardings)(jax.random.PRNGKey(self.tc.seed))
        return combine(fresh, base)

    def saved_state(self, state):
        """What a checkpoint holds of ``state`` (arrays or their abstract shapes): all of it; under LoRA the
        step, the adapters and their optimizer state, not the frozen base (the work directory's
        ``train_config.json`` names it, ``lora_base``)."""
        if self.lora is None:
            return state
        return {**state, "params": adapters_only(state["params"])}

    def from_saved(self, saved, fresh: Callable[[], dict]) -> dict:
        """The train state from a LoRA checkpoint's ``saved_state``: ``fresh()``'s base (loaded again) with the
        saved adapters, optimizer state and step."""
        state = fresh()
        return {**saved, "params": combine(saved["params"], state["params"])}

    def base_shardings(self):
        """``param_shardings`` without the adapters: where a pretrained base checkpoint's params go."""
        return without_adapters(self.param_shardings)

    def trainable_count(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts: total is the model's (LoRA adapters not included), trainable
        what the optimizer updates (the adapters' values, under LoRA; the router's correction bias, set by the
        balancing rule, counts as trainable when the patterns leave it so)."""
        shapes = nn.meta.unbox(abstract_params(self.config, self.model.options))
        leaves = jax.tree_util.tree_leaves_with_path(shapes)
        sizes = [math.prod(x.shape) for _, x in leaves]
        flags = jax.tree.leaves(self.trainable) if self.trainable is not None else [True] * len(sizes)
        model = sum(n for (p, _), n in zip(leaves, sizes) if not is_adapter_path(param_path(p)))
        return sum(n for n, t in zip(sizes, flags) if t), model

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
        params = nn.meta.unbox(abstract_params(self.config, self.model.options))
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

    def _loss(self, params, batch, norm=None, rng=None):
        """The total loss of (a micro-batch of) the batch; ``norm`` (``losses.loss_normalizers`` of the whole
        global batch, default this batch's) holds the counts every sum is divided by, so micro-batch losses
        add up to the batch's. ``rng``: the key of the LoRA adapters' dropout (none without it)."""
        c, tc = self.config, self.tc
        rngs = {} if rng is None else {DROPOUT_RNG: rng}
        if norm is None:
            norm = losses.loss_normalizers(batch, c.mtp_modules)
        mtp_on = c.mtp_modules > 0 and tc.mtp_weight > 0
        indexer_kl = None
        with nn.logical_axis_rules(self.rules):
            if self.model.options.indexer_loss is None:
                logits, aux = self.model.apply(
                    {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                    return_mtp=mtp_on, return_router_stats=True, rngs=rngs,
                )
            else:  # DeepSeek-V3.2's indexer stages: every layer sows (KL sum, queries)
                (logits, aux), sown = self.model.apply(
                    {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                    return_mtp=mtp_on, return_router_stats=True, mutable=["indexer_kl"], rngs=rngs,
                )
                # The mean over layers and real tokens of the global batch (micro-batches add up to it).
                sums = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(sown)])
                queries = norm.get("input_tokens", (batch["segment_ids"] > 0).sum().astype(jnp.float32))
                indexer_kl = sums.sum() / (sums.size * jnp.maximum(queries, 1.0))
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
        if indexer_kl is not None:
            total = total + tc.indexer_loss_weight * indexer_kl
        counts = {
            "moe": stats["counts"].sum(1) if stats else jnp.zeros((0, 1)),
            "mtp": mtp_stats["counts"].sum(1) if mtp_stats else jnp.zeros((0, 1)),
        }
        dropped = sum((s["dropped"].sum() for s in (stats, mtp_stats) if s), jnp.zeros((), jnp.int32))
        parts = {**objective_parts, "mtp_loss": mtp, "balance_loss": balance, "z_loss": z, "total_loss": total,
                 "input_tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32),
                 # keys the real tokens attend to (causal, within their document): the attention's FLOPs
                 "attended_keys": jnp.where(batch["segment_ids"] > 0, batch["positions"] + 1, 0).sum()
                 .astype(jnp.float32),
                 "moe_dropped": dropped.astype(jnp.float32)}
        if self.config.has_indexer:  # V3.2: the keys each token's attention reads, min(index_topk, visible)
            parts["selected_keys"] = jnp.where(batch["segment_ids"] > 0, jnp.minimum(
                batch["positions"] + 1, self.config.index_topk), 0).sum().astype(jnp.float32)
        if indexer_kl is not None:
            parts["indexer_kl"] = indexer_kl
        return total, (parts, counts)

    def _grads(self, params, batch, rng=None):
        """Gradients of the global batch's loss, summed over ``grad_accum`` micro-batches (a scan); every term
        divides by the global batch's counts, so this equals one big batch whatever the padding. ``rng``: the
        adapters' dropout key (each micro-batch folds in its index)."""
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        norm = losses.loss_normalizers(batch, self.config.mtp_modules)
        k = self.tc.grad_accum
        norm["micro_batches"] = k
        # Each gradient in its param's shards: the data-parallel sum then lowers to a reduce-scatter (not an
        # all-reduce of the whole weight followed by a slice).
        shard = partial(jax.lax.with_sharding_constraint,
                        shardings=with_fp8_shardings(self.param_shardings, params))  # QLoRA: FP8-kept leaves
        if self.trainable is not None:  # differentiate the trained leaves only; the others get zeros
            frozen = jax.tree.map(lambda t, p: None if t else p, self.trainable, params)
            inner = jax.value_and_grad(lambda tr, b, n, r: self._loss(combine(tr, frozen), b, n, r), has_aux=True)

            def grad_fn(params, b, n, r=None):
                out, g = inner(jax.tree.map(lambda t, p: p if t else None, self.trainable, params), b, n, r)
                return out, jax.tree.map(lambda t, gi, p: gi if t else jax.tree.map(jnp.zeros_like, p),
                                         self.trainable, g, params)
        if k == 1:
            (_, aux), grads = grad_fn(params, batch, norm, rng)
            return shard(grads), aux
        micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

        def body(acc, mb_i):
            mb, i = mb_i
            (_, aux), g = grad_fn(params, mb, norm, None if rng is None else jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, acc, (shard(g), aux)), None

        zero_g = shard(jax.tree.map(jnp.zeros_like, params))
        zero_aux = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), norm)[0][1])
        zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_aux)
        (grads, aux), _ = jax.lax.scan(body, (zero_g, zero_aux), (micro, jnp.arange(k)))
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

    def dropout_key(self, step) -> Optional[jax.Array]:
        """The adapters' dropout key of ``step`` (from the run's seed), or None when there is no adapter dropout."""
        if self.lora is None or not self.lora.dropout:
            return None
        return jax.random.fold_in(jax.random.PRNGKey(self.tc.seed), step)

    def _train_step(self, state, batch):
        grads, (parts, counts) = self._grads(state["params"], batch, self.dropout_key(state["step"]))
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if self.trainable is not None:  # frozen leaves stay exactly as they were
            params = jax.tree.map(lambda t, new, old: new if t else old, self.trainable, params, state["params"])
        params = self._update_biases(params, counts)
        # the trained leaves' (frozen ones get zeros; FP8-kept ones, QLoRA's base, would not even add up)
        grad_norm = optax.global_norm(grads if self.trainable is None else
                                      jax.tree.map(lambda t, g: g if t else None, self.trainable, grads))
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
            return self._run(self.step_fn(state), state, batch)

    def _run(self, step, *args):
        """``step(*args)``; in several processes the first call compiles, then waits for every process before
        running: the step's collectives would otherwise wait on a peer still compiling (gloo, on CPU, for 30 s
        only). The call reuses that compile."""
        if jax.process_count() > 1 and not self._compiled_everywhere:
            step.lower(*args).compile()
            wait_for_processes("train step compiled")
            self._compiled_everywhere = True
        return step(*args)

    def batch_shardings(self) -> dict:
        """Every batch entry over the batch axes (dim 0; dim 1 over the context axis when it is > 1)."""
        return {k: batch_sharding(self.mesh, self.batch_ndims.get(k, 2)) for k in self.batch_keys}

    def process_rows(self) -> tuple[int, int]:
        """``(start, stop)``: the rows of the global batch this process feeds (``parallel/rules.py``'s
        ``process_rows``): ``(0, batch_size)`` in one process."""
        if jax.process_count() == 1:
            return 0, self.tc.batch_size
        return process_rows(self.mesh, self.tc.batch_size, self.tc.seq_len)

    def put_batch(self, local_batch: dict) -> dict:
        """Host rows -> global arrays sharded over the batch axes (and the context axis). In one process the
        whole batch; in several, each process gives its ``process_rows()`` rows, whole (every token), or the
        whole global batch, and each of its devices is given its part: a block of rows, a slice of their tokens
        when the context axis spans processes, or a replica."""
        out = {}
        multi = jax.process_count() > 1
        start, stop = self.process_rows() if multi else (0, 0)
        for k, sharding in self.batch_shardings().items():
            x = np.asarray(local_batch[k])
            if not multi:
                out[k] = jax.device_put(x, sharding)
                continue
            b = self.tc.batch_size
            if x.shape[0] not in (b, stop - start):
                raise ValueError(f"batch entry {k!r}: {x.shape[0]} rows; process {jax.process_index()} feeds rows "
                                 f"[{start}, {stop}) of the global batch of {b} (or all {b})")
            offset = 0 if x.shape[0] == b else start

            def part(index, x=x, offset=offset):
                rows = index[0]
                return x[(slice((rows.start or 0) - offset, (b if rows.stop is None else rows.stop) - offset),
                          *index[1:])]

            out[k] = jax.make_array_from_callback((b, *x.shape[1:]), sharding, part)
        return out

    # ----- accounting -------------------------------------------------------------------------------
    def step_flops(self, tokens: float, attended_keys: float, selected_keys: float = None) -> float:
        """Model FLOPs of a training step over ``tokens`` real tokens attending ``attended_keys`` keys in all
        (the step's metrics hold both, and V3.2's ``selected_keys``): 6 x active params (routed experts at K/E)
        per token + attention per key (``models/counts.py``)."""
        mtp = self.config.mtp_modules > 0 and self.tc.mtp_weight > 0
        return batch_flops(self.config, tokens, attended_keys, train=True, mtp=mtp, selected_keys=selected_keys)

    def flops_per_token(self) -> float:
        """``step_flops`` per token of rows that are each one whole document (a causal context of (T + 1) / 2)."""
        t, c = self.tc.seq_len, self.config
        return self.step_flops(1.0, (t + 1) / 2, causal_selected(t, c.index_topk) if c.has_indexer else None)

