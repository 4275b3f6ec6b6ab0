"""``deepseek-jax plan``: compile the real train, prefill and decode steps for hardware one does not have.

Everything starts from abstract shapes (``jax.ShapeDtypeStruct`` with shardings): no weight is allocated. The
target is a TPU topology (``jax.experimental.topologies``: the real TPU compiler runs on this CPU, through the
``tpu`` extra's libtpu) or N simulated CPU devices. For each step the compiled program's ``memory_analysis()``
gives the bytes per device (arguments, outputs, aliased outputs, temporaries), and its optimized HLO gives the
collectives, each counted once per execution (``hlo.count_collectives``: loop bodies times their trips). FLOPs
come from the model (``models/counts.py``'s ``flops_per_token``), not from ``cost_analysis``, which counts a loop body
once.

A step fits when arguments + outputs - aliased + temporaries fit the device's memory: what the TPU compiler
reports as available HBM, or for CPU devices the host's RAM shared by the simulated devices (``device_memory``
overrides either).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Optional, Sequence

from deepseek_jax.tools.hlo import CollectiveStats, DcnStats, count_collectives, dcn_collectives, parse_module

STEPS = ("train", "prefill", "decode")
_HBM_ERROR = re.compile(r"required for (.*?) \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# DCN bandwidth per TPU host, and chips per host (v4, v5p: 4): the figure the seconds of cross-slice collectives
# are estimated at. 25 GB/s is the per-host DCN figure MaxText's and Google's multi-slice guides plan with.
DCN_BYTES_PER_S_PER_HOST = 25e9
CHIPS_PER_HOST = 4


class PlanError(RuntimeError):
    """The plan cannot be made (bad mesh, missing libtpu...); the message says why."""


@dataclasses.dataclass
class StepPlan:
    """One compiled step, per device (bytes), plus its analytic FLOPs (whole step, all devices)."""

    name: str
    compiled: bool
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    state_bytes: int = 0  # of the arguments: params + optimizer state (train) or params + cache (inference)
    collectives: dict[str, CollectiveStats] = dataclasses.field(default_factory=dict)
    dcn: dict[str, DcnStats] = dataclasses.field(default_factory=dict)  # the collectives that cross slices
    flops: float = 0.0
    tokens: int = 0
    compile_seconds: float = 0.0
    error: str = ""  # why it did not compile (e.g. the TPU compiler's out-of-memory report)
    required_bytes: int = 0  # when the compiler refused for memory: what it needed

    @property
    def peak_bytes(self) -> int:
        if not self.compiled:
            return self.required_bytes
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def fits(self, device_memory: Optional[int]) -> bool:
        if not self.compiled:
            return False
        return device_memory is None or self.peak_bytes <= device_memory


@dataclasses.dataclass
class Plan:
    model: str
    target: str
    device_kind: str
    devices: int
    device_memory: Optional[int]
    mesh: dict[str, int]
    batch: int
    seq_len: int
    cache_len: int
    precision: str
    remat: str
    params: int
    steps: list[StepPlan]
    num_slices: int = 1
    dcn_mesh: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return all(s.fits(self.device_memory) for s in self.steps)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for s, step in zip(d["steps"], self.steps):
            s["peak_bytes"] = step.peak_bytes
            s["fits"] = step.fits(self.device_memory)
        d["fits"] = self.fits
        return d

    def table(self) -> str:
        biggest = max([s.peak_bytes for s in self.steps] + [1])
        unit, scale = ("GB", 1e9) if biggest >= 1e9 else ("MB", 1e6)
        gb = lambda b: f"{b / scale:9.2f}"  # noqa: E731
        mem = format_bytes(self.device_memory)
        lines = [
            f"{self.model}: {self.params:,} params on {self.devices} x {self.device_kind} ({self.target}), "
            f"mesh {' '.join(f'{k}={v}' for k, v in self.mesh.items() if v > 1) or 'one device'}",
            f"batch {self.batch} x {self.seq_len} tokens, decode cache {self.cache_len}, {self.precision}, "
            f"remat {self.remat}; device memory {mem}",
            "",
            f"per device, {unit}   arguments  (state)    outputs    aliased  temporaries     peak   fits   TFLOPs"
            "  compile s",
        ]
        for s in self.steps:
            if not s.compiled:
                need = f"needs {s.required_bytes / 1e9:.1f} GB" if s.required_bytes else "did not compile"
                lines.append(f"{s.name:<15} {need}: {s.error}")
                continue
            lines.append(f"{s.name:<15}{gb(s.argument_bytes)}  {gb(s.state_bytes)}  {gb(s.output_bytes)}  "
                         f"{gb(s.alias_bytes)}  {gb(s.temp_bytes)}  {gb(s.peak_bytes)}   "
                         f"{'yes' if s.fits(self.device_memory) else 'NO ':>4}  {s.flops / 1e12:7.1f}"
                         f"  {s.compile_seconds:9.1f}")
        lines += ["", f"collectives per step and device (loop trips counted): count / {unit} of result buffers",
                  "(a ragged all-to-all counts its worst-case receive buffer, not the rows moved; a collective in a "
                  "lax.cond counts in every branch)"]
        kinds = sorted({k for s in self.steps for k in s.collectives})
        if kinds:
            lines.append(" " * 15 + "".join(f"{k:>26}" for k in kinds))
            for s in self.steps:
                if s.compiled:
                    cells = [s.collectives.get(k, CollectiveStats()) for k in kinds]
                    lines.append(f"{s.name:<15}" + "".join(f"{c.count:>14,d} {c.bytes / scale:>10.2f}" for c in cells))
            lines += self._balanced_ragged(scale, unit)
        else:
            lines.append("  none")
        if self.num_slices > 1:
            lines += self._dcn_table(scale, unit)
        return "\n".join(lines)

    def _dcn_table(self, scale: float, unit: str) -> list[str]:
        per_chip = DCN_BYTES_PER_S_PER_HOST / CHIPS_PER_HOST
        axes = " ".join(f"{k}={v}" for k, v in self.dcn_mesh.items() if v > 1)
        lines = ["", f"across the {self.num_slices} slices (DCN axes {axes}): the collectives whose groups span "
                 f"slices, count / {unit} of result buffers (TPU: of the megascale sends) / {unit} each device "
                 f"sends over DCN (hierarchical, by hand) / seconds at {DCN_BYTES_PER_S_PER_HOST / 1e9:g} GB/s per "
                 f"host of {CHIPS_PER_HOST} chips"]
        for s in self.steps:
            if not s.compiled:
                continue
            if not s.dcn:
                lines.append(f"{s.name:<15}none")
                continue
            for kind, st in sorted(s.dcn.items()):
                lines.append(f"{s.name:<15}{kind:<20}{st.count:>8,d} {st.bytes / scale:>10.2f} "
                             f"{st.dcn_bytes / scale:>10.2f} {st.dcn_bytes / per_chip:>9.3f} s")
            total = sum(st.dcn_bytes for st in s.dcn.values())
            lines.append(f"{s.name:<15}{'total':<20}{'':>8} {'':>10} {total / scale:>10.2f} "
                         f"{total / per_chip:>9.3f} s per step")
        return lines

    def _balanced_ragged(self, scale: float, unit: str) -> list[str]:
        """Rows a ragged all-to-all moves under balanced routing, by hand: a dropless exchange's receive buffer holds
        EP x a device's rows (the worst case, all of every peer's rows to one device); balanced, each device
        receives as many rows as it sends, 1 / EP of it, and (EP - 1) / EP of those from other chips."""
        ep = self.mesh.get("expert", 1)
        out = []
        for s in self.steps:
            ragged = s.collectives.get("ragged-all-to-all") if s.compiled else None
            if ragged is not None and ep > 1:
                got, remote = ragged.bytes / ep / scale, ragged.bytes * (ep - 1) / ep / ep / scale
                out.append(f"{s.name}: under balanced routing the ragged all-to-alls receive ~{got:.2f} {unit} per "
                           f"step (1/{ep} of the buffers, dropless), {remote:.2f} {unit} of it from other chips "
                           "(by hand)")
        return out


# ----- devices ------------------------------------------------------------------------------------------------
def target_devices(topology: Optional[str] = None, cpu_devices: Optional[int] = None, num_slices: int = 1) -> list:
    """The devices to compile for: a TPU topology such as ``v5p:4x4x4``, ``num_slices`` of them joined over DCN
    (no TPU needed: the tpu extra's libtpu compiles on this machine), or the first ``cpu_devices`` CPU devices
    (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before JAX starts; the CLI does it), which
    ``num_slices`` splits into simulated slices."""
    import jax

    if topology:
        try:
            from jax.experimental import topologies

            kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
            return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)
        except Exception as e:  # no libtpu, or a name it does not know
            raise PlanError(f"TPU topology {topology!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            " (the TPU compiler comes with `pip install 'deepseek-jax[tpu]'`)") from None
    devices = jax.devices("cpu")
    n = cpu_devices or len(devices)
    if n > len(devices):
        raise PlanError(f"{n} CPU devices asked for but JAX has {len(devices)}; start with "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return devices[:n]


def device_memory(devices: Sequence) -> Optional[int]:
    """Bytes one device can hold: the TPU compiler's available HBM (asked by compiling a program too large for
    any chip and reading the refusal), or for CPU devices the host RAM divided among them."""
    d = devices[0]
    if d.platform == "tpu":
        return _tpu_hbm(d)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)
    except (ValueError, OSError, AttributeError):
        return None


_HBM_CACHE: dict[str, Optional[int]] = {}


def _tpu_hbm(device) -> Optional[int]:
    if device.device_kind not in _HBM_CACHE:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.asarray([device]), ("x",))
        f = jax.jit(lambda x: jnp.sin(x) + jnp.cos(x)[::-1], in_shardings=NamedSharding(mesh, PartitionSpec()))
        found = None
        try:
            f.lower(jax.ShapeDtypeStruct((1 << 20, 1 << 20), jnp.float32)).compile()  # 4 TiB
        except Exception as e:
            m = _HBM_ERROR.search(str(e))
            found = int(float(m.group(4)) * _UNITS[m.group(5)]) if m else None
        _HBM_CACHE[device.device_kind] = found
    return _HBM_CACHE[device.device_kind]


# ----- compiling the steps --------------------------------------------------------------------------------------
def _shard_bytes(tree) -> int:
    import jax
    import numpy as np

    # Bits, not itemsize: a kept FP4 expert's uint4 codes are half a byte each (as XLA packs them on TPU).
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * jax.dtypes.itemsize_bits(x.dtype)
                   for x in jax.tree.leaves(tree)) // 8)


def _compile(name: str, jitted, args: tuple, state_bytes: int, flops: float, tokens: int, mesh,
             slice_of: Optional[list] = None) -> StepPlan:
    from deepseek_jax.parallel.mesh import mesh_context

    t0 = time.perf_counter()
    try:
        with mesh_context(mesh):
            compiled = jitted.lower(*args).compile()
    except Exception as e:
        msg = str(e)
        m = _HBM_ERROR.search(msg)
        first = next((line for line in msg.splitlines() if line.strip()), type(e).__name__)
        step = StepPlan(name, compiled=False, state_bytes=state_bytes, flops=flops, tokens=tokens,
                        compile_seconds=time.perf_counter() - t0, error=first[:300])
        if m:
            step.required_bytes = int(float(m.group(2)) * _UNITS[m.group(3)])
            step.error = f"{m.group(1)} need {float(m.group(2)):.2f} GiB, the device has {float(m.group(4)):.2f} GiB"
            return step
        raise PlanError(f"{name} step: {first}") from None
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    module = parse_module(text)
    dump = os.environ.get("DEEPSEEK_JAX_PLAN_HLO_DIR")
    if dump:  # the optimized HLO of each step, for reading where the bytes go
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
    return StepPlan(
        name, compiled=True, argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes), state_bytes=state_bytes,
        collectives=count_collectives(module), dcn=dcn_collectives(module, slice_of) if slice_of else {},
        flops=flops, tokens=tokens,
        compile_seconds=time.perf_counter() - t0)


def _train_step(config, tc, mesh, batch: int, seq_len: int, slice_of=None) -> StepPlan:
    import jax
    import jax.numpy as jnp

    from deepseek_jax.training.trainer import BATCH_KEYS, Trainer

    trainer = Trainer(config, tc, mesh)
    state = trainer.abstract_state()
    if tc.fp8_base:  # QLoRA: the frozen base's FP8 kernels as the release stores them
        state = {**state, "params": _kept_fp8(state["params"], config)}
    dtypes = {"loss_mask": jnp.float32}
    sds = {k: jax.ShapeDtypeStruct((batch, seq_len), dtypes.get(k, jnp.int32), sharding=trainer.batch_sharding)
           for k in BATCH_KEYS}
    flops = trainer.flops_per_token() * batch * seq_len
    return _compile("train", trainer.step_fn(state), (state, sds), _shard_bytes(state), flops, batch * seq_len,
                    mesh, slice_of)


def _kept_fp8(params, config):
    """Abstract params (sharded ``ShapeDtypeStruct``s; a LoRA kernel's adapters beside it) with the kernels the FP8
    release quantizes as ``Fp8Weight``s, e4m3 + 128x128 scales on block edges, and V4's routed experts as
    ``Fp4Weight``s, as ``load_pretrained(..., dtype="fp8")`` places them."""
    import jax
    import jax.numpy as jnp

    from deepseek_jax.quant.weights import fp8_shardings
    from deepseek_jax.tools.capacity import fp8_kept_kernels

    params = jax.tree.map(lambda x: x, params)  # a copy of the nested dicts, replaced in place below
    for path, (n_in, n_out, grid, cls) in fp8_kept_kernels(config).items():
        node = params
        for k in path[:-1]:
            node = node[k]
        x = node[path[-1]]
        q_sh, s_sh = fp8_shardings(x.sharding, x.shape, n_in, n_out, cls.BLOCKS)
        q_dtype, s_dtype = (jnp.uint4, jnp.bfloat16) if cls.Q_BITS == 4 else (jnp.float8_e4m3fn, jnp.float32)
        node[path[-1]] = cls(jax.ShapeDtypeStruct(x.shape, q_dtype, sharding=q_sh),
                             jax.ShapeDtypeStruct(grid, s_dtype, sharding=s_sh), n_in, n_out)
    return params


def _inference_inputs(config, options, mesh, batch: int, cache_len: int, cache_dtype: str,
                      weight_dtype: Optional[str] = None):
    """Abstract params (in the options' param dtype, sharded by the rules; ``weight_dtype="fp8"``: the kernels
    the FP8 release quantizes as ``Fp8Weight``s, e4m3 + 128x128 scales on block edges, and V4's routed experts as
    ``Fp4Weight``s, as ``load_pretrained(..., dtype="fp8")`` places them) and an empty cache (over the batch)."""
    import flax.linen as nn
    import jax

    from deepseek_jax.layers import kv_cache
    from deepseek_jax.models.transformer import abstract_params
    from deepseek_jax.parallel.rules import param_shardings

    boxed = abstract_params(config, options)
    shardings = param_shardings(boxed, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                          shardings)
    if weight_dtype == "fp8":
        params = _kept_fp8(params, config)
    cache = jax.eval_shape(lambda: kv_cache.init_cache(config, batch, cache_len, cache_dtype))
    cache_sh = kv_cache.cache_shardings(cache, mesh)
    cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache, cache_sh)
    return params, cache


def _batch_sds(mesh, shape, dtype):
    import jax

    from deepseek_jax.parallel.rules import logical_sharding

    names = ["act_batch"] + [None] * (len(shape) - 1)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=logical_sharding(names, shape, mesh))


def _prefill_step(config, options, mesh, batch, seq_len, cache_len, cache_dtype, weight_dtype=None,
                  slice_of=None) -> StepPlan:
    import functools

    import jax
    import jax.numpy as jnp

    from deepseek_jax.inference.steps import prefill_core
    from deepseek_jax.models.counts import causal_selected, flops_per_token

    params, cache = _inference_inputs(config, options, mesh, batch, cache_len, cache_dtype, weight_dtype)
    tokens = _batch_sds(mesh, (batch, seq_len), jnp.int32)
    lengths = _batch_sds(mesh, (batch,), jnp.int32)
    fn = jax.jit(functools.partial(prefill_core, config=config, options=options), donate_argnums=(1,))
    selected = causal_selected(seq_len, config.index_topk) if config.has_indexer else None
    flops = flops_per_token(config, seq_len / 2, train=False, mtp=False, selected=selected) * batch * seq_len
    return _compile("prefill", fn, (params, cache, tokens, lengths), _shard_bytes((params, cache)), flops,
                    batch * seq_len, mesh, slice_of)


def _decode_step(config, options, mesh, batch, cache_len, cache_dtype, weight_dtype=None, slice_of=None) -> StepPlan:
    import functools

    import jax
    import jax.numpy as jnp

    from deepseek_jax.inference.steps import decode_core
    from deepseek_jax.models.counts import flops_per_token

    params, cache = _inference_inputs(config, options, mesh, batch, cache_len, cache_dtype, weight_dtype)
    tokens = _batch_sds(mesh, (batch, 1), jnp.int32)
    positions = _batch_sds(mesh, (batch, 1), jnp.int32)
    fn = jax.jit(functools.partial(decode_core, config=config, options=options), donate_argnums=(1,))
    flops = flops_per_token(config, cache_len, train=False, mtp=False) * batch
    return _compile("decode", fn, (params, cache, tokens, positions), _shard_bytes((params, cache)), flops, batch,
                    mesh, slice_of)


def plan(config, *, mesh: Optional[str] = None, batch: int, seq_len: int, cache_len: Optional[int] = None,
         topology: Optional[str] = None, cpu_devices: Optional[int] = None, precision: str = "bf16",
         remat: str = "full", steps: Sequence[str] = STEPS, device_memory_bytes: Optional[int] = None,
         model_name: str = "model", train_overrides: Optional[dict] = None,
         infer_dtype: str = "bfloat16", cache_dtype: Optional[str] = None, weight_dtype: Optional[str] = None,
         num_slices: int = 1, dcn: Optional[str] = None) -> Plan:
    """Compile ``steps`` of ``config`` for a topology (or simulated CPU devices) and report per-device memory,
    collectives and FLOPs. ``batch`` is the global batch (sequences); ``seq_len`` the training / prefill length;
    ``cache_len`` the decode step's cache (default ``seq_len``). Training runs ``precision`` (fp32 master weights
    and Adam moments) with ``remat``; prefill and decode hold params in ``infer_dtype`` (``weight_dtype="fp8"``:
    the FP8 release's kernels as e4m3 + block scales) and compute in it. ``num_slices``: that many copies of the
    topology joined over DCN (or the CPU devices split into as many simulated slices), the mesh's ``dcn`` axes
    (``make_mesh``; default the leading one) spanning them; each step then also reports the collectives that cross
    slices and their DCN seconds."""
    from deepseek_jax.config.options import ModelOptions
    from deepseek_jax.models.counts import param_counts
    from deepseek_jax.training.config import TrainConfig

    for s in steps:
        if s not in STEPS:
            raise PlanError(f"unknown step {s!r}; expected some of {STEPS}")
    from deepseek_jax.parallel.mesh import make_mesh, parse_dcn_spec, parse_mesh_spec, slice_of_devices

    devices = target_devices(topology, cpu_devices, num_slices)
    try:
        m = make_mesh(mesh, devices, num_slices=num_slices, dcn=dcn)
        dcn_sizes = parse_dcn_spec(dcn, parse_mesh_spec(mesh, len(devices)), num_slices) if num_slices > 1 else {}
    except ValueError as e:
        raise PlanError(str(e)) from None
    slice_of = slice_of_devices(m, num_slices) if num_slices > 1 else None
    cache_len = cache_len or seq_len
    cache_dtype = cache_dtype or infer_dtype
    memory = device_memory_bytes if device_memory_bytes is not None else device_memory(devices)
    tc = TrainConfig(batch_size=batch, seq_len=seq_len, precision=precision, remat=remat, **(train_overrides or {}))
    options = ModelOptions(dtype=infer_dtype, param_dtype=infer_dtype, moe_dispatch=tc.moe_dispatch,
                           capacity_factor=tc.capacity_factor, platform=devices[0].platform)
    out = []
    for s in steps:
        if s == "train":
            out.append(_train_step(config, tc, m, batch, seq_len, slice_of))
        elif s == "prefill":
            out.append(_prefill_step(config, options, m, batch, seq_len, cache_len, cache_dtype, weight_dtype,
                                     slice_of))
        else:
            out.append(_decode_step(config, options, m, batch, cache_len, cache_dtype, weight_dtype, slice_of))
    where = topology or f"{len(devices)} simulated CPU devices"
    if num_slices > 1:
        where = f"{num_slices} x {topology}" if topology else f"{where} in {num_slices} slices"
    return Plan(model=model_name, target=where,
                device_kind=devices[0].device_kind, devices=len(devices), device_memory=memory,
                mesh=dict(m.shape), batch=batch, seq_len=seq_len, cache_len=cache_len, precision=precision,
                remat=remat, params=sum(param_counts(config).values()), steps=out, num_slices=num_slices,
                dcn_mesh=dcn_sizes)


def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r}: expected a size such as 16GB or 512MiB")
    unit = m.group(2).upper()
    base = 1024 if (m.group(3) or "").lower() == "ib" else 1000
    return int(float(m.group(1)) * base ** ("KMGT".index(unit) + 1 if unit else 0))
