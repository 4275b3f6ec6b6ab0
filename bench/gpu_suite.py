#!/usr/bin/env python3
"""One unattended GPU run that measures what the CPU cannot: parity of each GPU path, expert-dispatch GEMMs,
decode bandwidth, training MFU, and a side-by-side with PyTorch, all written to one JSON file as it goes.

    PYTHONPATH=. python3 bench/gpu_suite.py --out $OUT/gpu_suite.json     # on the GPU (bench/GPU.md: ~7.5 min)
    python bench/gpu_suite.py --smoke --out /tmp/gpu_suite.json           # the same code at tiny shapes, on CPU

It is built to run once under a hard time limit with no chance to debug: every section and every step in it
runs in its own try/except (an error is recorded in the JSON and the suite goes on), the JSON is rewritten after
every step (a killed run still leaves what it measured), a step that would not fit in its section's share of the
time left is skipped and says so, and a watchdog writes the JSON and exits if a step hangs past --deadline-s.

Sections, in the order they run (the seconds are estimates for an H200, XLA compilation included):
  peaks     ~6 s   dense bf16 matmul FLOP/s and copy bandwidth: the denominators of MFU and decode bandwidth
  parity    ~65 s  each GPU path against its reference, fixed seeds, tolerances per dtype
  dispatch  ~55 s  grouped-GEMM TFLOP/s at V3's expert shapes: blocked, ragged, tokamax, a dense ceiling
  decode    ~70 s  absorbed-MLA decode steps over a random latent cache: tokens/s and HBM bytes/s
  train     ~140 s Trainer steps of a V3-shaped ~1B-active model: tokens/s and MFU, bf16 and FP8 recipes
  torch     ~80 s  transformers' DeepseekV3ForCausalLM vs ours, same weights: prefill, generate, train step
Each section gets a share of the time left in proportion to these estimates (``section_budget``), so time one
section does not use goes to the next ones; each step carries its own estimate and is skipped when it would not
fit. The whole run ends by --deadline-s (450 s) after the start; the watchdog fires --grace-s (15 s) later.

It runs without an install (``PYTHONPATH=.``). One import needs help, done here and recorded under
``environment.shims``: tokamax's top-level import pulls in xprof (a 32 MB profiler, only for a kernel-stats timer
this suite never calls: a stub stands in when it is absent).
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the deadline counts from here (process start, near enough)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform as host_platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# JAX takes this fraction of GPU memory up front; the rest is for PyTorch in the side-by-side section.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.80")

import numpy as np  # noqa: E402

try:
    import jax
    import jax.numpy as jnp
    JAX_ERROR = None
except Exception as e:  # noqa: BLE001  (recorded; nothing else can run)
    JAX_ERROR = f"{type(e).__name__}: {e}"

# ----- the library entry points this suite uses (one place, for when modules move) ---------------------------
try:
    import flax.linen as nn

    import deepseek_jax as dsj
    from deepseek_jax.inference import steps as dsj_decode  # prefill, decode_step, decode_all_positions
    from deepseek_jax.layers import kv_cache as kvcache  # init_cache (the latent cache's shapes)
    from deepseek_jax.layers.attention.core import attention  # the attention core, "cudnn" / "blockwise" impls
    from deepseek_jax.layers.linear import MatmulRecipe
    from deepseek_jax.models.counts import active_params
    from deepseek_jax.moe.grouped import default_block_size, grouped_swiglu  # the MoE's grouped GEMM
    from deepseek_jax.parallel.mesh import make_mesh
    from deepseek_jax.quant.recipe import fp8_dots_supported, fp8_matmul  # the V3 FP8 recipe's GEMM
    from deepseek_jax.training.config import TrainConfig
    from deepseek_jax.training.trainer import Trainer

    LIBRARY_ERROR = None
except Exception as e:  # noqa: BLE001
    LIBRARY_ERROR = f"{type(e).__name__}: {e}"

H200_PEAK_FLOPS = 989e12  # dense bf16 FLOP/s, datasheet (SXM)
SHIMS: dict[str, str] = {}

# Parity tolerances: max |got - want| / max |want| over each compared array (gradients: each input's gradient
# against its own scale). bf16 values carry 8 significant bits (relative rounding 2^-9 = 0.2%), and a path
# rounds intermediate results (probabilities, SwiGLU intermediates, layer outputs) at different points than
# its reference; fp32 paths differ only in summation order.
TOLERANCES = {
    # cuDNN vs blockwise, both bf16 in and out, fp32 softmax statistics inside.
    "attention_bf16": {"values": 2e-2, "grads": 4e-2},
    # Real e4m3 dots vs exact bf16 copies of the same e4m3 values: the same products; Hopper's fp8 MMA keeps a
    # narrower accumulator within each 128-deep slice (V3 report 3.3.2), fp32 between slices. fp32 outputs.
    "fp8_dots_vs_emulated": {"values": 5e-3, "grads": 5e-3},
    # Grouped GEMM, bf16 inputs, bf16 SwiGLU intermediate, against fp32 math on the same bf16 inputs.
    "grouped_bf16": {"values": 2e-2, "grads": 3e-2},
    # Absorbed decode vs the full forward: logits (fp32 out of the head), after every layer's rounding.
    "decode_float32": {"logits": 1e-3},
    "decode_bfloat16": {"logits": 3e-2},
}


# ----- plans: the shapes of each section, full (H200) and smoke (CPU) ----------------------------------------
def _v3(**changes):
    return dsj.presets["deepseek-v3"].replace(num_nextn_predict_layers=0, **changes)


def _tiny(**changes):
    return dsj.presets["tiny-v3"].replace(num_nextn_predict_layers=0, **changes)


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    estimate_scale: float  # steps' time estimates (H200 seconds) are multiplied by this before the budget check
    matmul_n: int  # peaks: an n x n x n bf16 matmul
    copy_bytes: int  # peaks: the buffer copied
    attention: tuple  # (batch, length, heads, qk head dim, v head dim, block)
    fp8: tuple  # (M, K, N) of the FP8 linear
    grouped: tuple  # (tokens, hidden, expert width, experts, top-k, empty experts)
    decode_parity: Any  # ModelConfig
    decode_parity_tokens: tuple  # (batch, length, prefill length)
    dispatch: tuple  # (hidden, expert width, experts, top-k)
    dispatch_tokens: tuple
    model: Any  # the V3-shaped model of the decode and train sections
    decode_batches: tuple
    decode_lengths: tuple
    decode_steps: int
    train_batch: tuple  # (batch, sequence length)
    train_variants: tuple  # (precision, remat) in order of priority
    train_steps: int
    train_bf16_moments: bool  # Adam moments in bf16 (V3's recipe; halves their memory) or fp32
    torch_model: Any
    torch_prefill: int
    torch_generate: tuple  # (prompt length, new tokens, batches)
    torch_train: tuple  # (batch, sequence length)
    reps: int  # timed repetitions of a measured call


def full_plan() -> Plan:
    # ~1.06B active of ~5.1B parameters: MLA as V3 (q-LoRA 1536, latent 512, heads of 128 + 64 rope), 1 dense +
    # 11 MoE layers of 64 routed experts (width 1024, top-8 in 4 of 8 groups, sigmoid routing as V3) + 2 shared.
    # Train state: fp32 master weights and gradients, bf16 Adam moments: 12 bytes x 5.1B = 61 GB; activations of
    # 2 x 4096 tokens without remat ~25 GB.
    model = _v3(vocab_size=65536, hidden_size=2048, intermediate_size=8192, moe_intermediate_size=1024,
                num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                n_shared_experts=2, num_experts_per_tok=8, first_k_dense_replace=1, n_group=8, topk_group=4)
    # The side-by-side model: ~0.38B parameters, small enough for transformers' training step next to JAX's
    # pre-allocated memory; V3's attention head dims.
    torch_model = _tiny(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                        num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
                        max_position_embeddings=4096)  # = tiny-v3's YaRN factor 4 x its original 1024
    decode_parity = model.replace(num_hidden_layers=2, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                  topk_group=2, vocab_size=4096, intermediate_size=2048, moe_intermediate_size=512)
    return Plan(
        name="full", estimate_scale=1.0, matmul_n=16384, copy_bytes=4 << 30,
        attention=(2, 2048, 16, 192, 128, 512), fp8=(4096, 7168, 2048), grouped=(512, 1024, 512, 16, 4, 2),
        decode_parity=decode_parity, decode_parity_tokens=(2, 48, 16),
        dispatch=(7168, 2048, 256, 8), dispatch_tokens=(4096, 16384),
        model=model, decode_batches=(1, 32, 128), decode_lengths=(4096, 32768), decode_steps=20,
        train_batch=(2, 4096), train_variants=(("bf16", "none"), ("fp8", "none"), ("bf16", "full")), train_steps=4,
        train_bf16_moments=True,
        torch_model=torch_model, torch_prefill=2048, torch_generate=(16, 64, (1, 32)), torch_train=(2, 2048),
        reps=5,
    )


def smoke_plan() -> Plan:
    # All layers MoE (one scanned stack, so one layer body to compile on CPU), 2 of them.
    tiny = _tiny(first_k_dense_replace=0, num_hidden_layers=2)
    return Plan(
        name="smoke", estimate_scale=0.0, matmul_n=256, copy_bytes=8 << 20,
        attention=(2, 128, 2, 24, 16, 64), fp8=(192, 320, 256), grouped=(64, 64, 32, 8, 2, 1),
        decode_parity=tiny, decode_parity_tokens=(2, 16, 1),
        dispatch=(128, 64, 16, 4), dispatch_tokens=(128,),
        model=tiny, decode_batches=(1, 4), decode_lengths=(128,), decode_steps=3,
        # The bf16 variant's step is the side-by-side's (same train config): a persistent compilation cache
        # compiles it once.
        train_batch=(2, 32), train_variants=(("bf16", "none"), ("fp8", "none")), train_steps=2,
        train_bf16_moments=False,
        torch_model=tiny, torch_prefill=64, torch_generate=(8, 4, (2,)), torch_train=(2, 32),
        reps=2,
    )


# ----- the report, its sections and the clock -----------------------------------------------------------------
def elapsed() -> float:
    return time.monotonic() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def describe_error(e: BaseException) -> dict:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return {"error": f"{type(e).__name__}: {str(e)[:2000]}", "traceback": "".join(tb)[-4000:]}


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


class Report:
    """The JSON document: rewritten (to a temporary file, then renamed) after every step."""

    def __init__(self, path: str, doc: dict):
        self.path, self.doc = path, doc
        self.lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self) -> None:
        with self.lock:
            self.doc["suite"]["elapsed_s"] = round(elapsed(), 2)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.doc, f, indent=1, default=_jsonable)
            os.replace(tmp, self.path)


class Skipped(Exception):
    """A step that would not fit in the time left, or cannot run here."""


class PartialFailure(Exception):
    """A step whose result is partly measured: the result goes in the JSON, the step counts as an error."""

    def __init__(self, result: dict):
        super().__init__("; ".join(f"{k}: {v['error']}" for k, v in result.get("errors", {}).items()))
        self.result = result


class Section:
    """One section's record: ``results`` by step, ``errors`` and ``skipped`` by step, its own timing."""

    def __init__(self, report: Report, name: str, deadline: float, scale: float):
        self.report, self.name, self.deadline, self.scale = report, name, deadline, scale
        self.data = {"status": "running", "started_s": round(elapsed(), 2), "budget_s": round(deadline - elapsed(), 1),
                     "results": {}, "errors": {}, "skipped": {}}
        report.doc["sections"][name] = self.data
        report.write()

    def left(self) -> float:
        return self.deadline - elapsed()

    def step(self, name: str, estimate_s: float, fn: Callable[[], Any]):
        """Run ``fn`` unless its estimate (H200 seconds, compile included) exceeds the section's time left;
        record its result (a dict) or its error; return the result (None if skipped or failed)."""
        need = estimate_s * self.scale
        if need > self.left():
            self.data["skipped"][name] = f"needs ~{need:.0f} s, {max(self.left(), 0):.0f} s left in this section"
            log(f"{self.name}/{name}: skipped ({self.data['skipped'][name]})")
            self.report.write()
            return None
        t = time.monotonic()
        try:
            result = fn()
            if isinstance(result, dict):
                result.setdefault("step_s", round(time.monotonic() - t, 2))
            self.data["results"][name] = result
            log(f"{self.name}/{name}: done in {time.monotonic() - t:.1f} s")
            return result
        except Skipped as e:
            self.data["skipped"][name] = str(e)
            log(f"{self.name}/{name}: skipped ({e})")
        except PartialFailure as e:
            self.data["results"][name] = e.result
            self.data["errors"][name] = describe_error(e)
            log(f"{self.name}/{name}: partly failed: {str(e)[:300]}")
        except Exception as e:  # noqa: BLE001  (recorded; the suite goes on)
            self.data["errors"][name] = describe_error(e)
            log(f"{self.name}/{name}: ERROR {type(e).__name__}: {str(e)[:300]}")
        finally:
            gc.collect()
            self.report.write()
        return None

    def close(self, status: Optional[str] = None) -> None:
        self.data["elapsed_s"] = round(elapsed() - self.data["started_s"], 2)
        self.data["status"] = status or ("errors" if self.data["errors"] else "ok")
        self.report.write()


# ----- measuring ----------------------------------------------------------------------------------------------
def measure(run_once: Callable[[], float], reps: int, warmup: int = 1, max_s: float = 60.0) -> dict:
    """Seconds per call: ``run_once()`` does one call and returns its own duration (it ends with
    ``block_until_ready`` / a device sync). The first call (which compiles) is reported alone, then ``warmup``
    calls, then the median of ``reps`` calls; a slow first call (> max_s / 4) skips the warm-up, and the timed
    calls stop once they have taken ``max_s``."""
    first = run_once()
    if first < max_s / 4:
        for _ in range(warmup):
            run_once()
    times: list[float] = []
    start = time.monotonic()
    while len(times) < reps and (not times or time.monotonic() - start < max_s):
        times.append(run_once())
    return {"median_s": statistics.median(times), "first_call_s": round(first, 3), "reps": len(times),
            "min_s": min(times)}


def timed(fn: Callable, *args, reps: int, warmup: int = 1, max_s: float = 60.0) -> dict:
    """``measure`` for a jitted (or compiled) ``fn(*args)`` whose outputs are device arrays."""

    def once():
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t

    return measure(once, reps, warmup, max_s)


def custom_calls(hlo: str) -> list[str]:
    """The custom-call targets in optimized HLO text (which library kernels XLA picked: cuDNN attention,
    cuBLAS(Lt) GEMMs, Triton fusions...)."""
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))


def rel_error(got, want) -> float:
    """max |got - want| / max |want| (both as float64)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def rel_error_tree(got, want) -> float:
    """The worst ``rel_error`` over matching leaves (each gradient against its own scale)."""
    return max(rel_error(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def check(error: float, tolerance: float) -> dict:
    return {"error": error, "tolerance": tolerance, "pass": bool(error <= tolerance)}


HOST_RANDOM_MAX = 1 << 24  # arrays up to this many elements are drawn by numpy (no compile per shape)


def normal(seed: int, shape, dtype, std: float = 1.0):
    """N(0, std^2) values of ``shape`` on the device: drawn by numpy when small (each eager jax.random call
    compiles once per shape, which adds up on CPU), by one jitted jax.random call when large."""
    if math.prod(shape) <= HOST_RANDOM_MAX:
        x = np.random.default_rng(seed).standard_normal(shape, np.float32) * np.float32(std)
        return jnp.asarray(x.astype(jnp.dtype(dtype)))
    return _device_normal(seed, tuple(shape), jnp.dtype(dtype), float(std))


@functools.partial(jax.jit, static_argnums=(1, 2, 3)) if JAX_ERROR is None else (lambda f: f)
def _device_normal(seed, shape, dtype, std):
    return (jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * std).astype(dtype)


def random_tokens(seed: int, shape, vocab: int):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32))


def backend() -> str:
    return jax.default_backend()


def on_gpu() -> bool:
    return backend() == "gpu"


def init_params(config, options, seed: int = 0):
    """Fresh params of ``Transformer(config, options)`` (in ``options.param_dtype``), made on the device."""
    model = dsj.Transformer(config, options)
    init = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 2), jnp.int32))["params"]))
    return init(jax.random.PRNGKey(seed))


def to_compute_dtype(params, dtype):
    """Params cast to ``dtype``, the router's correction bias kept fp32 (as load_pretrained does)."""
    def cast(path, x):
        return x if str(getattr(path[-1], "key", "")) == "e_score_correction_bias" else x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def model_summary(config) -> dict:
    c = config
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(jax.eval_shape(
        lambda: nn.meta.unbox(dsj.Transformer(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))))))
    return {
        "hidden": c.hidden_size, "layers": c.num_hidden_layers, "dense_layers": c.first_k_dense_replace,
        "heads": c.num_attention_heads, "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
        "qk_nope_head_dim": c.qk_nope_head_dim, "qk_rope_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim,
        "dense_intermediate": c.intermediate_size, "routed_experts": c.n_routed_experts,
        "shared_experts": c.n_shared_experts, "expert_width": c.moe_intermediate_size,
        "top_k": c.num_experts_per_tok, "n_group": c.n_group, "topk_group": c.topk_group,
        "routing": f"{c.scoring_func} / {c.topk_method}", "vocab": c.vocab_size,
        "mtp_modules": c.num_nextn_predict_layers,
        "params_total": int(total), "params_active": int(active_params(c, mtp=False)),
    }


# ----- imports that need help without an install --------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def import_tokamax():
    """tokamax (or ImportError). Its top-level import reaches ``xprof.cli.tools`` (for a kernel-stats timer in its
    benchmarking module that this suite never calls); where xprof is absent a stub module stands in."""
    if importlib.util.find_spec("tokamax") is None:
        raise ImportError("tokamax is not installed")
    if "xprof" not in sys.modules and importlib.util.find_spec("xprof") is None:
        names = ("xprof", "xprof.cli", "xprof.cli.tools", "xprof.cli.tools.get_kernel_stats_tool")
        for name in names:
            stub = types.ModuleType(name)
            stub.__path__ = []
            sys.modules.setdefault(name, stub)
        sys.modules["xprof.cli.tools"].get_kernel_stats_tool = sys.modules[names[-1]]
        SHIMS["xprof"] = "stub module (tokamax imports it at import time; not used here)"
    import tokamax

    return tokamax


def tokamax_implementation() -> str:
    """tokamax's ragged_dot kernel to measure: its Mosaic GPU kernel on a GPU, its XLA form elsewhere."""
    return "mosaic" if on_gpu() else "xla"


class TokamaxRecipe(MatmulRecipe):
    """The default matmul recipe with ``ragged_dot`` done by tokamax, so ``grouped_swiglu(..., impl="ragged")``
    runs our grouped path with tokamax's kernel in place of ``jax.lax.ragged_dot``."""

    def __init__(self, dtype, implementation: str):
        super().__init__(dtype)
        self.tokamax, self.implementation = import_tokamax(), implementation

    def ragged_dot(self, lhs, rhs, group_sizes):
        lhs, rhs = lhs.astype(self.dtype), rhs.astype(self.dtype)
        try:
            out = self.tokamax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=self.accum,
                                          implementation=self.implementation)
        except NotImplementedError:  # (at trace time) a kernel without this output dtype: fp32 out, then cast
            out = self.tokamax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32,
                                          implementation=self.implementation)
        return out.astype(self.out_dtype)


# ----- environment ----------------------------------------------------------------------------------------------
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax",
            "optax", "orbax-checkpoint", "chex", "numpy", "ml_dtypes", "torch", "transformers", "safetensors",
            "tokamax", "qwix", "jaxtyping", "pydantic")


def _version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(args: list[str]) -> Optional[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=REPO).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def environment() -> dict:
    env = {"python": sys.version.split()[0], "host": host_platform.platform(), "argv": sys.argv,
           "packages": {name: _version(name) for name in PACKAGES},
           "git_commit": _command(["git", "rev-parse", "HEAD"]),
           "nvidia_smi": _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                   "--format=csv,noheader"]),
           "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
           "jax_error": JAX_ERROR, "library_error": LIBRARY_ERROR}
    if JAX_ERROR:
        return env
    env["backend"] = backend()
    devices = jax.devices()
    env["device_count"] = len(devices)
    d = devices[0]
    env["device"] = {"kind": d.device_kind, "platform": d.platform,
                     "compute_capability": getattr(d, "compute_capability", None)}
    with contextlib.suppress(Exception):
        env["device"]["memory_bytes_limit"] = d.memory_stats().get("bytes_limit")
    with contextlib.suppress(Exception):
        from jax._src.lib import cuda_versions  # private: the CUDA / cuDNN versions jaxlib was built and runs with

        if cuda_versions is not None:
            env["cuda"] = {"runtime": cuda_versions.cuda_runtime_get_version(),
                           "cudnn": cuda_versions.cudnn_get_version(),
                           "driver": cuda_versions.cuda_driver_get_version()}
    if LIBRARY_ERROR is None:
        env["fp8_dots"] = bool(fp8_dots_supported(d))
    return env


# ----- 0. peaks -------------------------------------------------------------------------------------------------
def section_peaks(sec: Section, p: Plan) -> None:
    def matmul():  # ~3 s: a 16384^3 bf16 matmul (8.8 TFLOP, ~11 ms) x 12
        n = p.matmul_n
        a, b = normal(0, (n, n), jnp.bfloat16), normal(1, (n, n), jnp.bfloat16)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
        t = timed(f, a, b, reps=max(p.reps, 10))
        return {"shape": [n, n, n], "flops_per_call": 2 * n**3, **t, "tflops": 2 * n**3 / t["median_s"] / 1e12,
                "datasheet_tflops": H200_PEAK_FLOPS / 1e12}

    def copy():  # ~2 s: y = x + 1 over a 4 GiB bf16 buffer: 8 GiB moved per call (~2 ms)
        x = jnp.zeros((p.copy_bytes // 2,), jnp.bfloat16)
        f = jax.jit(lambda x: x + jnp.ones((), x.dtype))
        t = timed(f, x, reps=max(p.reps, 10))
        moved = 2 * p.copy_bytes
        return {"buffer_bytes": p.copy_bytes, "bytes_per_call": moved, "formula": "read + write of the buffer",
                **t, "gb_per_s": moved / t["median_s"] / 1e9}

    sec.step("matmul_bf16", 3, matmul)
    sec.step("copy", 2, copy)


# ----- 1. parity --------------------------------------------------------------------------------------------------
def _segments(rows: list[list[int]], length: int) -> np.ndarray:
    """Segment ids ``[B, T]`` from per-row document lengths (documents 1, 2, ...; the rest is padding, 0)."""
    out = np.zeros((len(rows), length), np.int32)
    for r, docs in enumerate(rows):
        at = 0
        for i, n in enumerate(docs):
            out[r, at: at + n] = i + 1
            at += n
    return out


def parity_attention(p: Plan) -> dict:
    """The cuDNN path (attention impl "cudnn") against the blockwise core, bf16, values and gradients, MLA's head
    dims (q/k 192, v 128; V is padded to 192 inside the cudnn path). Unpacked rows (one document, the second row
    right-padded) run cuDNN's fused kernel; packed rows take the blockwise fallback inside the same path.
    ~12 s: two fwd+bwd compiles at [2, 2048, 16, 192], both layouts through each, 5 timed calls each."""
    b, t, h, dk, dv, block = p.attention
    q, k, v = (normal(10 + i, (b, t, h, d), jnp.bfloat16) for i, d in ((0, dk), (1, dk), (2, dv)))
    cot = normal(13, (b, t, h, dv), jnp.bfloat16)
    scale = dk ** -0.5
    plat = backend()

    def values_and_grads(impl):
        def f(q, k, v, layout, cot):
            out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, layout, scale, impl, block, plat,
                                                              self_attention=True), q, k, v)
            return out, pullback(cot)

        return jax.jit(f)

    layouts = {
        "unpacked": _segments([[t], [t - t // 8]], t),
        "packed": _segments([[t // 3, t // 2, t - t // 3 - t // 2], [t // 4, t // 2]], t),
    }
    layouts = {name: dsj.attention_layout(jnp.asarray(seg)) for name, seg in layouts.items()}
    fused = values_and_grads("cudnn").lower(q, k, v, layouts["unpacked"], cot).compile()
    hlo = fused.as_text()
    reference = values_and_grads("blockwise")
    out = {"dtype": "bfloat16", "shape": {"batch": b, "length": t, "heads": h, "qk_head_dim": dk, "v_head_dim": dv},
           "implementation": "cudnn" if plat == "gpu" else "xla (jax.nn.dot_product_attention's XLA form: no GPU)",
           "cudnn_attention_in_hlo": "fmha" in hlo.lower(), "custom_calls": custom_calls(hlo),
           "metric": "max|got-want|/max|want|"}
    tol = TOLERANCES["attention_bf16"]
    for name, layout in layouts.items():
        (o1, g1), (o0, g0) = fused(q, k, v, layout, cot), reference(q, k, v, layout, cot)
        out[name] = {"values": check(rel_error(o1, o0), tol["values"]),
                     "grads": check(rel_error_tree(g1, g0), tol["grads"]),
                     "note": ("cuDNN's fused kernel" if name == "unpacked"
                              else "the blockwise fallback (lax.cond) inside the cudnn path")}
    out["fwd_bwd_s"] = {"cudnn": timed(fused, q, k, v, layouts["unpacked"], cot, reps=p.reps)["median_s"],
                        "blockwise": timed(reference, q, k, v, layouts["unpacked"], cot, reps=p.reps)["median_s"]}
    return out


def parity_fp8(p: Plan) -> dict:
    """The FP8 recipe's GEMM (``fp8_matmul``: e4m3 1x128 activation tiles, 128x128 weight blocks, fp32 promotion
    every 128) with real e4m3 dots against the emulated recipe (exact bf16 copies of the same e4m3 values), forward
    (y = x W), dgrad and wgrad, fp32 outputs. ~15 s: two fwd+bwd compiles at 4096 x 7168 x 2048, 5 timed calls."""
    m, k, n = p.fp8
    x = normal(20, (m, k), jnp.bfloat16)
    w = normal(21, (k, n), jnp.float32, std=k ** -0.5)
    cot = normal(22, (m, n), jnp.float32)
    f32 = jnp.dtype("float32")

    def values_and_grads(dots: bool):
        def f(x, w, cot):
            y, pullback = jax.vjp(lambda x, w: fp8_matmul(x, w, f32, dots), x, w)
            return y, pullback(cot)

        return jax.jit(f)

    real = values_and_grads(True).lower(x, w, cot).compile()
    hlo = real.as_text()
    emulated = values_and_grads(False)
    (y1, g1), (y0, g0) = real(x, w, cot), emulated(x, w, cot)
    tol = TOLERANCES["fp8_dots_vs_emulated"]
    return {"shape": {"M": m, "K": k, "N": n}, "hardware_fp8_dots": bool(fp8_dots_supported(jax.devices()[0])),
            "f8e4m3_in_hlo": "f8e4m3fn" in hlo, "custom_calls": custom_calls(hlo),
            "metric": "max|got-want|/max|want|",
            "values": check(rel_error(y1, y0), tol["values"]), "grads": check(rel_error_tree(g1, g0), tol["grads"]),
            "fwd_bwd_s": {"fp8_dots": timed(real, x, w, cot, reps=p.reps)["median_s"],
                          "emulated": timed(emulated, x, w, cot, reps=p.reps)["median_s"]}}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4)) if JAX_ERROR is None else (lambda f: f)
def random_routing(seed, tokens: int, experts: int, k: int, empty: int = 0):
    """Expert ids ``[N, K]`` (distinct per token) from the top-k of random scores, the last ``empty`` experts
    never chosen and loads skewed (later experts favored), and the rows sorted by expert as the MoE hands them
    to the grouped GEMM: ``(order, group_sizes, expert of each sorted row)``; ``order[j]`` is sorted row j's token."""
    scores = jax.random.uniform(jax.random.PRNGKey(seed), (tokens, experts))
    scores = scores + 0.5 * jnp.linspace(0.0, 1.0, experts)
    if empty:
        scores = scores.at[:, experts - empty:].set(-jnp.inf)
    _, idx = jax.lax.top_k(scores, k)
    flat = idx.reshape(-1).astype(jnp.int32)
    perm = jnp.argsort(flat, stable=True)
    return (perm // k).astype(jnp.int32), jnp.bincount(flat, length=experts).astype(jnp.int32), flat[perm]


def expert_weights(seed: int, experts: int, d: int, i: int, dtype):
    return (normal(seed, (experts, d, i), dtype, d ** -0.5), normal(seed + 1, (experts, d, i), dtype, d ** -0.5),
            normal(seed + 2, (experts, i, d), dtype, i ** -0.5))


def grouped_reference(x, order, expert_of_row, wg, wu, wd):
    """Every expert on every token in fp32 (plain einsums), then each sorted row's (expert, token) result."""
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    hi = jax.lax.Precision.HIGHEST
    h = jax.nn.silu(jnp.einsum("nd,edi->eni", f32(x), f32(wg), precision=hi)) * jnp.einsum(
        "nd,edi->eni", f32(x), f32(wu), precision=hi)
    y = jnp.einsum("eni,eid->end", h, f32(wd), precision=hi)
    return y[expert_of_row, order]


def parity_grouped(p: Plan) -> dict:
    """``grouped_swiglu`` (blocked, ragged = jax.lax.ragged_dot, gather, and the ragged path with tokamax's
    ragged_dot) against the fp32 dense reference on the same bf16 inputs, skewed loads with empty experts.
    Values for all; gradients (x and the three weight stacks) for blocked, ragged and tokamax.
    ~12 s: one small compile per path (512 tokens x top-4 of 16 experts, hidden 1024, width 512)."""
    n, d, i, e, k, empty = p.grouped
    x = normal(30, (n, d), jnp.bfloat16)
    wg, wu, wd = expert_weights(31, e, d, i, jnp.bfloat16)
    order, sizes, expert_of_row = random_routing(34, n, e, k, empty)
    cot = normal(35, (n * k, d), jnp.float32)

    def vjp_of(f):
        def run(x, wg, wu, wd):
            y, pullback = jax.vjp(f, x, wg, wu, wd)
            return y, pullback(cot.astype(y.dtype))

        return jax.jit(run)

    want_y, want_g = vjp_of(lambda *a: grouped_reference(a[0], order, expert_of_row, *a[1:]))(x, wg, wu, wd)
    bf16 = MatmulRecipe(jnp.bfloat16)
    out = {"shape": {"tokens": n, "hidden": d, "expert_width": i, "experts": e, "top_k": k, "empty_experts": empty},
           "group_sizes": np.asarray(sizes).tolist(), "reference": "fp32 per-expert einsums on the bf16 inputs",
           "metric": "max|got-want|/max|want|", "dtype": "bfloat16", "block_size": default_block_size(n * k, e)}
    tol = TOLERANCES["grouped_bf16"]
    paths = {"blocked": (bf16, "blocked", True), "ragged": (bf16, "ragged", True), "gather": (bf16, "gather", False),
             "tokamax": (None, "ragged", True)}
    errors = {}
    for name, (recipe, impl, grads) in paths.items():
        try:
            if name == "tokamax":
                recipe = TokamaxRecipe(jnp.bfloat16, tokamax_implementation())
            def f(x, wg, wu, wd, recipe=recipe, impl=impl):
                return grouped_swiglu(recipe, x, order, sizes, wg, wu, wd, impl)

            if grads:
                y, g = vjp_of(f)(x, wg, wu, wd)
                out[name] = {"values": check(rel_error(y, want_y), tol["values"]),
                             "grads": check(rel_error_tree(g, want_g), tol["grads"])}
            else:
                out[name] = {"values": check(rel_error(jax.jit(f)(x, wg, wu, wd), want_y), tol["values"])}
            if name == "tokamax":
                out[name]["implementation"] = tokamax_implementation()
        except ImportError as err:
            out[name] = {"skipped": str(err)}
        except Exception as err:  # noqa: BLE001  (one path failing leaves the others)
            errors[name] = describe_error(err)
    if errors:
        out["errors"] = errors
        raise PartialFailure(out)
    return out


def fixed_routing(params, config):
    """The routers' correction bias set to 10 x (E - e) for expert e, so every token picks experts 0..K-1 (the
    bias moves choices, never the combine weights, which stay each token's own). In bf16 the two paths' hidden
    states differ by rounding, and where two experts' scores nearly tie that flips a top-k choice: one such
    position in 32 showed 10x the others' error, a discontinuity of routing rather than of the decode math."""
    bias = 10.0 * (config.n_routed_experts - jnp.arange(config.n_routed_experts, dtype=jnp.float32))

    def fix(path, x):
        if str(getattr(path[-1], "key", "")) == "e_score_correction_bias":
            return jnp.broadcast_to(bias, x.shape).astype(x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(fix, params)


def parity_decode(p: Plan) -> dict:
    """Logits of the absorbed decode (prefill the first P tokens, then one decode step per token over the latent
    cache) against the full forward (``Transformer``) at every position: fp32 (params, compute, cache; the
    random router as initialized) and bf16 (``fixed_routing``).
    ~25 s: per dtype a forward, a prefill, a full-path prompt forward and a decode step compile (2 layers)."""
    config = p.decode_parity
    b, t, pre = p.decode_parity_tokens
    params = init_params(config, dsj.ModelOptions())
    tokens = random_tokens(41, (b, t), config.vocab_size)
    out = {"tokens": [b, t], "prefill": pre, "decode_steps": t - pre, "metric": "max|got-want|/max|want| of logits",
           "routing": {"float32": "as initialized", "bfloat16": "fixed to experts 0..K-1 (fixed_routing)"}}
    for dtype in ("float32", "bfloat16"):
        options = dsj.ModelOptions(dtype=dtype)
        prm = params if dtype == "float32" else to_compute_dtype(fixed_routing(params, config), jnp.bfloat16)
        # fp32 means fp32 matmuls everywhere (no TF32), attention's einsums included.
        precision = jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()
        with precision:
            model = dsj.Transformer(config, options)
            full = jax.jit(lambda p_, t_: model.apply({"params": p_}, t_))(prm, tokens)
            cached = dsj_decode.decode_all_positions(prm, tokens, config=config, options=options, cache_dtype=dtype,
                                                     absorb=True, prefill_len=pre)
        full, cached = np.asarray(full, np.float32), np.asarray(cached, np.float32)
        tol = TOLERANCES[f"decode_{dtype}"]["logits"]
        out[dtype] = {"decode_positions": check(rel_error(cached[:, pre:], full[:, pre:]), tol),
                      "prefill_positions": check(rel_error(cached[:, :pre], full[:, :pre]), tol),
                      "argmax_agreement": float(np.mean(cached.argmax(-1) == full.argmax(-1)))}
    return out


def section_parity(sec: Section, p: Plan) -> None:
    sec.step("attention_cudnn", 12, lambda: parity_attention(p))
    sec.step("fp8_dots", 15, lambda: parity_fp8(p))
    sec.step("grouped_gemm", 12, lambda: parity_grouped(p))
    sec.step("absorbed_decode", 25, lambda: parity_decode(p))


# ----- 5. expert dispatch ---------------------------------------------------------------------------------------------
def section_dispatch(sec: Section, p: Plan) -> None:
    """Grouped SwiGLU at V3's expert shapes (hidden 7168, width 2048, 256 experts, top-8), bf16, random balanced
    routing: TFLOP/s of ``grouped_swiglu`` blocked / ragged (jax.lax.ragged_dot) / tokamax's ragged_dot in the
    ragged path, and a dense SwiGLU of the same FLOPs (one expert's weights for every row) as the ceiling.
    FLOPs = 2 x rows x 3 x hidden x width forward (rows = tokens x top-k), 3x that forward + backward.
    ``gather`` is left out: it materializes [rows, 7168, 2048] weights (~1 TB at 4k tokens)."""
    d, i, e, k = p.dispatch
    wg, wu, wd = expert_weights(50, e, d, i, jnp.bfloat16)
    jax.block_until_ready(wd)
    bf16 = MatmulRecipe(jnp.bfloat16)
    sec.data["results"]["setup"] = {"hidden": d, "expert_width": i, "experts": e, "top_k": k, "dtype": "bfloat16",
                                    "routing": "top-k of uniform random scores (balanced on average)",
                                    "flops_formula": "forward 2*tokens*top_k*3*hidden*width; forward+backward 3x"}

    def grouped(recipe, impl):
        return lambda x, order, sizes, wg, wu, wd: grouped_swiglu(recipe, x, order, sizes, wg, wu, wd, impl)

    def dense_equivalent(x, order, sizes, wg, wu, wd):
        xs = x[order]
        h = jax.nn.silu(xs @ wg[0]) * (xs @ wu[0])
        return h @ wd[0]

    def tokamax_path():
        return grouped(TokamaxRecipe(jnp.bfloat16, tokamax_implementation()), "ragged")

    paths = {"blocked": lambda: grouped(bf16, "blocked"), "ragged": lambda: grouped(bf16, "ragged"),
             "tokamax": tokamax_path, "dense_equivalent": lambda: dense_equivalent}

    def run(mode, n, name):
        try:
            f = paths[name]()
        except ImportError as err:
            raise Skipped(str(err)) from None
        x = normal(n, (n, d), jnp.bfloat16)
        order, sizes, _ = random_routing(n + 1, n, e, k, 0)
        rows = n * k
        fwd_flops = 2 * rows * 3 * d * i
        if mode == "forward":
            fn, flops = jax.jit(f), fwd_flops
        else:
            cot = normal(n + 2, (rows, d), jnp.bfloat16)

            def fwd_bwd(x, order, sizes, wg, wu, wd):
                _, pullback = jax.vjp(lambda x, wg, wu, wd: f(x, order, sizes, wg, wu, wd), x, wg, wu, wd)
                return pullback(cot)

            fn, flops = jax.jit(fwd_bwd), 3 * fwd_flops
        # The ceiling gets one expert's weights only, so its backward does not fill 256 experts' zero gradients.
        weights = (wg[:1], wu[:1], wd[:1]) if name == "dense_equivalent" else (wg, wu, wd)
        t = timed(fn, x, order, sizes, *weights, reps=p.reps, max_s=5.0)
        res = {"tokens": n, "rows": rows, "flops": flops, **t, "tflops": flops / t["median_s"] / 1e12}
        if name == "blocked":
            res["block_size"] = default_block_size(rows, e)
        if name == "tokamax":
            res["implementation"] = tokamax_implementation()
        return res

    # Per call ~3-8 s (compile ~2-5 s, then ~5 ms forward at 4k tokens, ~20 ms at 16k; 3x with the backward);
    # ragged may expand into dense per-expert matmuls on this backend (256x the FLOPs): it runs last in each group,
    # and a slow first call cuts its repetitions (``measure``).
    # A path at under 1/20 of the best rate of its group (ragged expanded densely, say) is not run again at the
    # larger sizes and with the backward: one slow path must not eat the section.
    slow = {}
    for mode, est in (("forward", 4), ("forward_backward", 7)):
        for n in p.dispatch_tokens:
            for name in ("blocked", "tokamax", "dense_equivalent", "ragged"):
                if name in slow:
                    sec.data["skipped"][f"{mode}/{n}/{name}"] = slow[name]
                    continue
                sec.step(f"{mode}/{n}/{name}", est, lambda: run(mode, n, name))
            rates = {name: sec.data["results"].get(f"{mode}/{n}/{name}", {}).get("tflops") for name in
                     ("blocked", "tokamax", "dense_equivalent", "ragged")}
            best = max((r for r in rates.values() if r), default=0.0)
            for name, r in rates.items():
                if r and r < best / 20 and p.estimate_scale > 0:  # (the smoke plan has no time budget)
                    slow[name] = f"{r:.2f} TFLOP/s at {mode}/{n}, under 1/20 of the best ({best:.1f})"
    picks = {}
    for mode in ("forward", "forward_backward"):
        for n in p.dispatch_tokens:
            got = {name: sec.data["results"].get(f"{mode}/{n}/{name}", {}).get("tflops")
                   for name in ("blocked", "ragged", "tokamax")}
            got = {k_: v for k_, v in got.items() if v}
            if got:
                library = {k_: v for k_, v in got.items() if k_ in ("blocked", "ragged")}
                picks[f"{mode}/{n}"] = {"fastest": max(got, key=got.get),
                                        "fastest_library_impl": max(library, key=library.get) if library else None,
                                        "current_default": dsj.ModelOptions().grouped_impl(n * k, e)}
    sec.data["results"]["fastest"] = picks
    for key_, v in picks.items():
        log(f"dispatch {key_}: fastest {v['fastest']} (library: {v['fastest_library_impl']}; "
            f"default now: {v['current_default']})")


# ----- 3. decode ------------------------------------------------------------------------------------------------------
def weight_bytes(params, config) -> dict:
    """Bytes of the params by what a decode step reads of them: all of ``other`` (attention, norms, dense and
    shared MLPs, routers, head), one row of the embedding per sequence, and per MoE layer the routed experts that
    its tokens chose."""
    out = {"embedding": 0, "routed_experts": 0, "other": 0}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(q, "key", q)) for q in path]
        kind = ("embedding" if names[0] == "embed_tokens" else
                "routed_experts" if "experts" in names and "shared_experts" not in names else "other")
        out[kind] += x.size * x.dtype.itemsize
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    out["moe_layers"] = moe_layers
    out["expert_bytes"] = out["routed_experts"] // max(moe_layers * config.n_routed_experts, 1)
    out["embedding_row_bytes"] = out["embedding"] // config.vocab_size
    return out


def expected_active_experts(experts: int, k: int, batch: int) -> float:
    """Distinct experts a MoE layer's ``batch`` tokens choose, each token k of E uniformly:
    E x (1 - (1 - k/E)^batch) (exactly k at batch 1)."""
    return experts * (1.0 - (1.0 - k / experts) ** batch)


def decode_bytes(wb: dict, config, batch: int, slots: int) -> dict:
    """The bytes one decode step must read at least: weights (as ``weight_bytes`` says, routed experts by
    ``expected_active_experts``) plus the whole latent cache buffer (the absorbed attention scores every slot of
    it: ``batch x slots x layers x (kv_lora_rank + qk_rope_head_dim) x 2`` bytes in bf16)."""
    active = expected_active_experts(config.n_routed_experts, config.num_experts_per_tok, batch)
    weights = wb["other"] + batch * wb["embedding_row_bytes"] + wb["moe_layers"] * active * wb["expert_bytes"]
    cache = batch * slots * config.num_hidden_layers * config.kv_cache_dim * 2
    return {"weights": int(round(weights)), "cache": int(cache), "total": int(round(weights)) + int(cache),
            "active_experts_per_layer": active}


def random_cache(config, batch: int, slots: int, seed: int):
    """A bf16 latent cache of ``slots`` slots holding N(0, 1) values, made on the device without a prefill: one
    random block of up to 4096 slots, tiled over the slots, layers and sequences (the broadcast is written
    straight into the cache: drawing 29G values at once for 128 x 32k would need a temporary as large again)."""
    shapes = jax.eval_shape(lambda: kvcache.init_cache(config, batch, slots, "bfloat16"))
    leaves, treedef = jax.tree.flatten(shapes)

    def fill(key, shape, dtype):  # shape [L, B, S, D]
        block = min(shape[2], 4096)
        tile = jax.random.normal(key, (block, shape[3]), dtype)
        return jnp.broadcast_to(jnp.tile(tile, (-(-shape[2] // block), 1))[: shape[2]], shape)

    make = jax.jit(lambda keys: [fill(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])
    return jax.tree.unflatten(treedef, make(jax.random.split(jax.random.PRNGKey(seed), len(leaves))))


def section_decode(sec: Section, p: Plan, copy_gb_s: Optional[float]) -> None:
    """``decode.decode_step`` (absorbed MLA over the latent cache, bf16 params and cache) of the V3-shaped model at
    each batch x cache length: a random cache of exactly that many slots, positions near its end, one compile per
    shape, then ``decode_steps`` steps each ended by block_until_ready: tokens/s = batch / median step and
    achieved bytes/s = ``decode_bytes`` / median step."""
    config = p.model
    options = dsj.ModelOptions(dtype="bfloat16", param_dtype="bfloat16")
    params = init_params(config, options, seed=7)
    wb = weight_bytes(params, config)
    sec.data["results"]["setup"] = {
        "model": model_summary(config), "weights": wb, "copy_gb_s": copy_gb_s, "steps": p.decode_steps,
        "bytes_formula": "weights: all non-expert params + batch embedding rows + moe_layers x E*(1-(1-k/E)^batch) "
                         "routed experts; cache: batch x slots x layers x (kv_lora_rank + qk_rope_head_dim) x 2 "
                         "(bf16, every slot is read)",
    }

    def run(batch, slots):
        tokens = random_tokens(batch, (batch, 1), config.vocab_size)
        state = {"cache": random_cache(config, batch, slots, batch * 7 + slots),
                 "pos": slots - p.decode_steps - 4}  # the steps write their tokens into the last slots

        def once():
            pos = jnp.full((batch, 1), state["pos"], jnp.int32)
            t = time.perf_counter()
            state["cache"], logits, _ = dsj_decode.decode_step(params, state["cache"], tokens, pos, config=config,
                                                               options=options, absorb=True)
            logits.block_until_ready()
            state["pos"] += 1
            return time.perf_counter() - t

        t = measure(once, reps=p.decode_steps, warmup=2)
        state.clear()  # frees the cache before the next shape's
        nbytes = decode_bytes(wb, config, batch, slots)
        res = {"batch": batch, "cache_slots": slots, **t, "tokens_per_s": batch / t["median_s"],
               "bytes_per_step": nbytes, "achieved_gb_s": nbytes["total"] / t["median_s"] / 1e9,
               "moe_impl": options.grouped_impl(batch * config.num_experts_per_tok, config.n_routed_experts)}
        if copy_gb_s:
            res["fraction_of_copy_bandwidth"] = res["achieved_gb_s"] / copy_gb_s
        return res

    # ~8 s a shape (one decode-step compile, the random cache, 22 steps; the 128 x 32k step reads a 58 GB cache,
    # ~15 ms). The largest shape runs last.
    for slots in p.decode_lengths:
        for batch in p.decode_batches:
            sec.step(f"batch{batch}_slots{slots}", 8 if slots <= 4096 else 12, lambda: run(batch, slots))


# ----- 2. training throughput ----------------------------------------------------------------------------------------
def random_batch(rng: np.random.RandomState, batch: int, length: int, vocab: int) -> dict:
    tokens = rng.randint(0, vocab, (batch, length + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
            "segment_ids": np.ones((batch, length), np.int32), "loss_mask": np.ones((batch, length), np.float32)}


def train_throughput(config, tc, steps: int, reps_max_s: float = 30.0, params=None) -> dict:
    """Tokens/s of ``Trainer.run_step`` (the real step: forward, backward, AdamW, bias update, skip-on-NaN) on
    random token batches; the first step (compile) timed alone, one warm-up, then the median of ``steps``."""
    trainer = Trainer(config, tc, make_mesh(None, jax.devices()[:1]))
    t = time.perf_counter()
    box = {"state": trainer.init_state() if params is None else trainer.state_from_params(params), "i": 0}
    jax.block_until_ready(box["state"])
    init_s = time.perf_counter() - t
    rng = np.random.RandomState(0)
    batches = [trainer.put_batch(random_batch(rng, tc.batch_size, tc.seq_len, config.vocab_size)) for _ in range(2)]

    def once():
        t = time.perf_counter()
        box["state"], box["metrics"] = trainer.run_step(box["state"], batches[box["i"] % 2])
        jax.block_until_ready(box["metrics"])
        box["i"] += 1
        return time.perf_counter() - t

    timing = measure(once, reps=steps, warmup=1, max_s=reps_max_s)
    tokens = tc.batch_size * tc.seq_len
    loss = float(box["metrics"]["loss"])
    flops_per_token = trainer.flops_per_token()
    box.clear()  # frees the train state before the next variant's
    gc.collect()
    return {"init_s": round(init_s, 2), **timing, "tokens_per_step": tokens,
            "tokens_per_s": tokens / timing["median_s"], "flops_per_token": flops_per_token, "loss_last_step": loss}


def section_train(sec: Section, p: Plan, matmul_tflops: Optional[float]) -> None:
    """The V3-shaped model's training step at ``train_batch``, per (precision, remat) variant in priority order:
    tokens/s and MFU = flops_per_token x tokens/s / peak, against the H200 datasheet's 989 TFLOP/s and against the
    matmul peak measured in ``peaks``. flops_per_token = 3 x (2 x active params + attention), attention =
    2 x layers x heads x (qk_head_dim + v_head_dim) x T/2 (causal), active params = everything but the embedding
    table with routed experts at top_k / E (``Trainer.flops_per_token`` / ``info.flops_per_token``)."""
    config = p.model
    b, t = p.train_batch
    sec.data["results"]["setup"] = {
        "model": model_summary(config), "batch": b, "seq_len": t,
        "optimizer": f"AdamW ({'bf16' if p.train_bf16_moments else 'fp32'} moments), fp32 master weights",
        "attention": "auto (cuDNN on GPU for bf16 rows > 512 tokens)", "moe_dispatch": "auto",
        "mfu_formula": "flops_per_token * tokens_per_s / peak; flops_per_token = 3*(2*active_params + "
                       "2*layers*heads*(qk_head_dim+v_head_dim)*seq_len/2)",
        "datasheet_peak_tflops": H200_PEAK_FLOPS / 1e12, "measured_peak_tflops": matmul_tflops,
        "goal": "bf16 MFU >= 40% (datasheet)",
    }

    def run(precision, remat):
        tc = TrainConfig(steps=1000, batch_size=b, seq_len=t, precision=precision, remat=remat, mtp_weight=0.0,
                         bf16_moments=p.train_bf16_moments, warmup_steps=10, learning_rate=1e-4)
        res = train_throughput(config, tc, p.train_steps)
        achieved = res["flops_per_token"] * res["tokens_per_s"]
        res["mfu_datasheet"] = achieved / H200_PEAK_FLOPS
        if matmul_tflops:
            res["mfu_measured_peak"] = achieved / (matmul_tflops * 1e12)
        res.update(precision=precision, remat=remat)
        return res

    # ~45 s a variant (init compile ~8 s, step compile ~25-35 s, 6 steps of ~0.2-0.5 s). A variant that runs out
    # of memory takes the others of its remat policy with it: they are replaced by the same precision with "full".
    variants, out_of_memory = list(p.train_variants), set()
    while variants:
        precision, remat = variants.pop(0)
        name = f"{precision}_remat-{remat}"
        if remat in out_of_memory:
            sec.data["skipped"][name] = f"remat {remat!r} ran out of memory in an earlier variant"
            if (precision, "full") not in p.train_variants and (precision, "full") not in variants:
                variants.append((precision, "full"))
            continue
        sec.step(name, 45, lambda: run(precision, remat))
        error = sec.data["errors"].get(name, {}).get("error", "")
        if "RESOURCE_EXHAUSTED" in error or "out of memory" in error.lower():
            out_of_memory.add(remat)
            if remat != "full" and (precision, "full") not in variants:
                variants.insert(0, (precision, "full"))
    best = {}
    for name, r in sec.data["results"].items():
        if name != "setup" and r.get("precision") and r.get("tokens_per_s", 0) > best.get(r["precision"], {}).get(
                "tokens_per_s", 0):
            best[r["precision"]] = {"variant": name, "tokens_per_s": r["tokens_per_s"],
                                    "mfu_datasheet": r["mfu_datasheet"]}
    sec.data["results"]["best"] = best


# ----- 4. side by side with PyTorch ----------------------------------------------------------------------------------
def section_torch(sec: Section, p: Plan) -> None:
    """transformers' DeepseekV3ForCausalLM and ours on the same weights (the HF model built with a fixed seed,
    ``save_pretrained``, loaded by ``dsj.load_pretrained``), same device, bf16: prefill 1 x N (logits of the
    last position, cache filled), greedy generate (``generate`` with do_sample=False, use_cache=True against
    ``dsj.generate``) at each batch, and a train step (fwd + bwd + AdamW; fp32 master weights with bf16 autocast
    against our bf16 recipe, fp32 moments on both sides). Ratios are ours / theirs in tokens/s."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from hf_reference import hf_config  # noqa: E402  (the tests' config translation)
    from transformers import DeepseekV3ForCausalLM

    config = p.torch_model
    cuda = torch.cuda.is_available() and on_gpu()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 2)))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # The shared weights: transformers' own random init (seeded, made on the device, the routers' correction
    # bias drawn too), saved in bf16, read back by both sides (our fp32 master copy holds the same values).
    tmp = tempfile.mkdtemp(prefix="gpu_suite_hf_")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        with torch.device(device):
            source = DeepseekV3ForCausalLM(hf_config(config)).to(torch.bfloat16)
        with torch.no_grad():
            for name, buf in source.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.normal_(0.0, 0.05)
        source.save_pretrained(tmp)
        del source
        params32 = to_compute_dtype(dsj.load_pretrained(tmp)[1], jnp.float32)
    gc.collect()

    def load_hf(dtype, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=dtype, **kw).to(device)
        return model

    attn, hf = "sdpa", {}  # hf: the bf16 inference model, dropped before the training one is loaded
    try:
        hf["bf16"] = load_hf(torch.bfloat16, attn_implementation=attn).eval()
    except Exception:  # noqa: BLE001  (a transformers without sdpa for this model: eager)
        attn = "eager"
        hf["bf16"] = load_hf(torch.bfloat16, attn_implementation=attn).eval()
    params = to_compute_dtype(params32, jnp.bfloat16)
    options = dsj.ModelOptions(dtype="bfloat16")
    sec.data["results"]["setup"] = {
        "model": model_summary(config), "device": str(device), "torch": torch.__version__,
        "hf_attention": getattr(hf["bf16"].config, "_attn_implementation", attn),
        "hf_experts": getattr(hf["bf16"].config, "_experts_implementation", None), "dtype": "bfloat16",
        "goal": "ours / transformers >= 1.5x on each"}

    def ratio(ours, theirs):
        return {"ours_tokens_per_s": ours, "theirs_tokens_per_s": theirs, "ratio": ours / theirs}

    def prefill():  # ~12 s: our prefill compile at 1 x 2048 and 5 + 5 timed calls
        n = p.torch_prefill
        tokens = np.random.RandomState(1).randint(0, config.vocab_size, (1, n)).astype(np.int32)
        lengths = jnp.full((1,), n, jnp.int32)
        slots = dsj_decode.cache_length(n, 64)
        tok_j, ids = jnp.asarray(tokens), torch.as_tensor(tokens, dtype=torch.long, device=device)
        last = {}

        def ours_once():
            cache = kvcache.init_cache(config, 1, slots, "bfloat16")
            jax.block_until_ready(cache)
            t = time.perf_counter()
            _, logits, _ = dsj_decode.prefill(params, cache, tok_j, lengths, config=config, options=options)
            logits.block_until_ready()
            last["ours"] = logits
            return time.perf_counter() - t

        @torch.no_grad()
        def theirs_once():
            sync()
            t = time.perf_counter()
            out = hf["bf16"](ids, use_cache=True, logits_to_keep=1)
            sync()
            last["theirs"] = out.logits[:, -1]
            return time.perf_counter() - t

        ours, theirs = measure(ours_once, p.reps, 2), measure(theirs_once, p.reps, 2)
        a, b = np.asarray(last["ours"], np.float32), last["theirs"].float().cpu().numpy()
        return {"tokens": n, **ratio(n / ours["median_s"], n / theirs["median_s"]), "ours": ours, "theirs": theirs,
                "same_weights_check": {"max_abs_logit_diff": float(np.abs(a - b).max()),
                                       "logit_scale": float(np.abs(b).max()),
                                       "argmax_equal": bool(a.argmax() == b.argmax())}}

    def generate(batch):  # ~15 s a batch: our prefill + decode compiles, then one timed run each side
        prompt, new, _ = p.torch_generate
        tokens = np.random.RandomState(2).randint(0, config.vocab_size, (batch, prompt))
        ids = torch.as_tensor(tokens, dtype=torch.long, device=device)

        def ours_once():
            t = time.perf_counter()
            r = dsj.generate(config, params, tokens.tolist(), max_new_tokens=new, eos_token_id=None, options=options,
                             cache_dtype="bfloat16")
            assert all(len(s) == new for s in r.tokens), "ours stopped early"
            return time.perf_counter() - t

        @torch.no_grad()
        def theirs_once():
            sync()
            t = time.perf_counter()
            out = hf["bf16"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
            sync()
            assert out.shape[1] == prompt + new, "transformers stopped early"
            return time.perf_counter() - t

        ours, theirs = measure(ours_once, 2, 1), measure(theirs_once, 2, 1)
        n = batch * new
        return {"batch": batch, "prompt": prompt, "new_tokens": new,
                **ratio(n / ours["median_s"], n / theirs["median_s"]), "ours": ours, "theirs": theirs,
                "note": "whole generate call (prefill + decode + host loop) over batch x new tokens"}

    def train_step():  # ~35 s: our train step compile (init from the loaded weights), HF fp32 model + fused AdamW
        b, t = p.torch_train
        tc = TrainConfig(steps=1000, batch_size=b, seq_len=t, precision="bf16", remat="none", mtp_weight=0.0,
                         bf16_moments=False, warmup_steps=10, learning_rate=1e-4)
        ours = train_throughput(config, tc, p.reps, params=params32)
        hf32 = load_hf(torch.float32, attn_implementation=attn).train()
        opt = torch.optim.AdamW(hf32.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                **({"fused": True} if cuda else {}))
        batch = torch.as_tensor(np.random.RandomState(0).randint(0, config.vocab_size, (b, t)), dtype=torch.long,
                                device=device)

        def theirs_once():
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = hf32(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            return time.perf_counter() - t0

        experts = getattr(hf32.config, "_experts_implementation", None)
        try:
            theirs = measure(theirs_once, p.reps, 1)
        except Exception as e:  # noqa: BLE001  (grouped_mm without a backward here: the eager experts loop)
            experts = f"eager (after {type(e).__name__}: {str(e)[:200]})"
            hf32 = load_hf(torch.float32, attn_implementation=attn, experts_implementation="eager").train()
            opt = torch.optim.AdamW(hf32.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                    **({"fused": True} if cuda else {}))
            theirs = measure(theirs_once, p.reps, 1)
        n = b * t
        return {"batch": b, "seq_len": t, **ratio(ours["tokens_per_s"], n / theirs["median_s"]), "ours": ours,
                "theirs": theirs, "theirs_experts": experts,
                "theirs_recipe": "fp32 params, torch.autocast bf16, AdamW(fused on CUDA)"}

    sec.step("prefill", 12, prefill)
    for batch in p.torch_generate[2]:
        sec.step(f"generate_batch{batch}", 15, lambda: generate(batch))
    hf.clear()  # the inference copy goes before the training one comes
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    sec.step("train_step", 35, train_step)


# ----- the summary table ----------------------------------------------------------------------------------------------
def _fmt(v, unit="") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}{unit}" if abs(v) < 1e4 else f"{v:,.0f}{unit}"
    return f"{v}{unit}"


def summary_rows(doc: dict) -> list[list[str]]:
    """[figure, value, goal, status] rows from whatever the report holds so far."""
    rows = []
    secs = doc.get("sections", {})
    res = lambda name: secs.get(name, {}).get("results", {})  # noqa: E731
    r = res("peaks")
    if "matmul_bf16" in r:
        rows.append(["peak bf16 matmul", _fmt(r["matmul_bf16"]["tflops"], " TFLOP/s"), "datasheet 989", ""])
    if "copy" in r:
        rows.append(["copy bandwidth", _fmt(r["copy"]["gb_per_s"], " GB/s"), "", ""])
    for name, res_ in res("parity").items():
        for sub, entry in _checks(res_):
            rows.append([f"parity {name} {sub}", f"{entry['error']:.2e}", f"<= {entry['tolerance']:.0e}",
                         "PASS" if entry["pass"] else "FAIL"])
    r = res("dispatch")
    for mode in ("forward", "forward_backward"):
        for key in sorted({k.split("/")[1] for k in r if k.startswith(mode + "/")}, key=int):
            figs = [f"{name} {r[f'{mode}/{key}/{name}']['tflops']:.0f}" for name in
                    ("blocked", "ragged", "tokamax", "dense_equivalent") if f"{mode}/{key}/{name}" in r]
            fastest = r.get("fastest", {}).get(f"{mode}/{key}", {}).get("fastest", "")
            rows.append([f"dispatch {mode} {key} tok TFLOP/s", ", ".join(figs), "", f"fastest {fastest}"])
    for key, v in res("decode").items():
        if key.startswith("batch"):
            frac = v.get("fraction_of_copy_bandwidth")
            goal = ">= 70% of copy" if v["batch"] == 1 else ""
            status = "" if frac is None or v["batch"] != 1 else ("PASS" if frac >= 0.7 else "FAIL")
            rows.append([f"decode {key}", f"{v['tokens_per_s']:.0f} tok/s, {v['achieved_gb_s']:.0f} GB/s"
                         + (f" ({100 * frac:.0f}% copy)" if frac is not None else ""), goal, status])
    for key, v in res("train").items():
        if key not in ("setup", "best"):
            mfu = v["mfu_datasheet"]
            goal = ">= 40% MFU" if v["precision"] == "bf16" else ""
            status = ("PASS" if mfu >= 0.4 else "FAIL") if v["precision"] == "bf16" else ""
            measured = v.get("mfu_measured_peak")
            rows.append([f"train {key}", f"{v['tokens_per_s']:.0f} tok/s, MFU {100 * mfu:.1f}%"
                         + (f" ({100 * measured:.1f}% of measured)" if measured else ""), goal, status])
    for key, v in res("torch").items():
        if key != "setup":
            rows.append([f"vs torch {key}", f"{v['ratio']:.2f}x ({v['ours_tokens_per_s']:.0f} vs "
                         f"{v['theirs_tokens_per_s']:.0f} tok/s)", ">= 1.5x", "PASS" if v["ratio"] >= 1.5 else "FAIL"])
    for name, s in secs.items():
        for step, err in s.get("errors", {}).items():
            rows.append([f"ERROR {name}/{step}", err["error"][:70], "", "ERROR"])
        for step, why in s.get("skipped", {}).items():
            rows.append([f"skipped {name}/{step}", why[:70], "", "SKIP"])
    return rows


def _checks(tree, prefix=""):
    """(path, entry) of every parity check ({"error", "tolerance", "pass"}) in a result tree."""
    if isinstance(tree, dict):
        if {"error", "tolerance", "pass"} <= set(tree):
            yield prefix.strip("/"), tree
            return
        for k, v in tree.items():
            yield from _checks(v, f"{prefix}/{k}")


def print_table(doc: dict) -> None:
    rows = summary_rows(doc)
    widths = [max(len(r[i]) for r in rows + [["figure", "value", "goal", ""]]) for i in range(3)]
    print(f"\n{'figure'.ljust(widths[0])}  {'value'.ljust(widths[1])}  {'goal'.ljust(widths[2])}  status", flush=True)
    for r in rows[:55]:
        print(f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2].ljust(widths[2])}  {r[3]}", flush=True)
    if len(rows) > 55:
        print(f"... {len(rows) - 55} more rows in the JSON", flush=True)


# ----- main -----------------------------------------------------------------------------------------------------------
SECTIONS = ("peaks", "parity", "dispatch", "decode", "train", "torch")
ESTIMATES = {"peaks": 6, "parity": 65, "dispatch": 55, "decode": 70, "train": 140, "torch": 80}  # H200 seconds


def section_budget(name: str, order: list[str], left: float) -> float:
    """Seconds section ``name`` may use of the ``left`` before the deadline: its share in proportion to the
    estimates of it and the sections after it, raised to 1.5x its own estimate where the later sections' estimates
    still fit after that (a small section whose first compile is slower than guessed keeps its last steps)."""
    mine, later = ESTIMATES[name], sum(ESTIMATES[s] for s in order[order.index(name) + 1:])
    share = left * mine / (mine + later)
    return max(0.0, share, min(1.5 * mine, left - later))


def start_watchdog(report: Report, hard_deadline: float, current: dict) -> None:
    """Past ``hard_deadline`` (seconds since start) a hung step would take the whole run down with it: write
    the JSON (saying where it hung), print the table, and exit."""

    def fire():
        report.doc["suite"]["watchdog"] = {"fired_at_s": round(elapsed(), 1), "in_section": current.get("name")}
        report.doc["summary"] = summary_rows(report.doc)
        if report.lock.acquire(timeout=10):
            report.lock.release()
        with contextlib.suppress(Exception):
            report.write()
        log(f"watchdog: past {hard_deadline:.0f} s in section {current.get('name')}; JSON written, exiting")
        with contextlib.suppress(Exception):
            print_table(report.doc)
        os._exit(3)

    timer = threading.Timer(max(hard_deadline - elapsed(), 0), fire)
    timer.daemon = True
    timer.start()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "out", "gpu_suite.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU); the same code paths")
    ap.add_argument("--deadline-s", type=float, default=450.0,
                    help="seconds from start after which no new step starts (steps also skip when they would not "
                         "fit their section's share of the time left)")
    ap.add_argument("--grace-s", type=float, default=15.0, help="the watchdog exits this long after the deadline")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    ap.add_argument("--compile-cache", default=os.path.join(tempfile.gettempdir(), "deepseek_jax_gpu_suite_xla"),
                    help="persistent XLA compilation cache ('' for none; JAX_COMPILATION_CACHE_DIR wins)")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; expected some of {SECTIONS}")

    plan_name = "smoke" if args.smoke else "full"
    report = Report(args.out, {"suite": {"version": 1, "mode": plan_name, "deadline_s": args.deadline_s,
                                         "sections": only, "finished": False},
                               "environment": {}, "tolerances": TOLERANCES, "sections": {}, "summary": []})
    current: dict = {}
    start_watchdog(report, args.deadline_s + args.grace_s, current)
    report.doc["environment"] = environment()
    report.write()
    env = report.doc["environment"]
    log(f"{env.get('device', {}).get('kind')} ({env.get('backend')}), jax {env['packages']['jax']}, "
        f"plan {plan_name}, deadline {args.deadline_s:.0f} s")
    if JAX_ERROR or LIBRARY_ERROR:
        log(f"cannot run: {JAX_ERROR or LIBRARY_ERROR}")
        report.doc["summary"] = [["import", JAX_ERROR or LIBRARY_ERROR, "", "ERROR"]]
        report.write()
        return 2
    if args.compile_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        with contextlib.suppress(Exception):
            jax.config.update("jax_compilation_cache_dir", args.compile_cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    plan = smoke_plan() if args.smoke else full_plan()

    def run(name: str, body: Callable[[Section], None]) -> None:
        sec = Section(report, name, elapsed() + section_budget(name, only, args.deadline_s - elapsed()),
                      plan.estimate_scale)
        left = args.deadline_s - elapsed()
        current["name"] = name
        log(f"== {name}: {sec.left():.0f} s budget")
        if left <= 0:
            sec.data["skipped"]["all"] = "past the deadline"
            sec.close("skipped")
            return
        try:
            body(sec)
            sec.close()
        except Exception as e:  # noqa: BLE001  (a section's own setup failing: recorded, the suite goes on)
            sec.data["errors"]["section"] = describe_error(e)
            log(f"{name}: ERROR {type(e).__name__}: {str(e)[:300]}")
            sec.close("errors")
        finally:
            gc.collect()
            report.doc["summary"] = summary_rows(report.doc)
            report.write()

    peaks = report.doc["sections"]
    bodies = {
        "peaks": lambda sec: section_peaks(sec, plan),
        "parity": lambda sec: section_parity(sec, plan),
        "dispatch": lambda sec: section_dispatch(sec, plan),
        "decode": lambda sec: section_decode(sec, plan, peaks.get("peaks", {}).get("results", {}).get(
            "copy", {}).get("gb_per_s")),
        "train": lambda sec: section_train(sec, plan, peaks.get("peaks", {}).get("results", {}).get(
            "matmul_bf16", {}).get("tflops")),
        "torch": lambda sec: section_torch(sec, plan),
    }
    for name in only:
        run(name, bodies[name])
    report.doc["suite"]["finished"] = True
    report.doc["suite"]["shims"] = SHIMS
    report.doc["environment"]["shims"] = SHIMS
    report.doc["summary"] = summary_rows(report.doc)
    report.write()
    print_table(report.doc)
    log(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
