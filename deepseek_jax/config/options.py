"""Runtime choices that do not change the architecture: dtypes, remat, scan, MoE dispatch, matmul recipe."""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Optional

import jax
import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MOE_DISPATCHES = ("auto", "blocked", "ragged", "gather", "dense")
ATTENTIONS = ("auto", "blockwise", "naive", "splash", "cudnn")
PLATFORMS = (None, "cpu", "gpu", "tpu")
MATMUL_RECIPES = ("default", "fp8")
FP8_WEIGHT_MATMULS = ("auto", "pallas", "xla")
# LoRA's default targets: every attention projection (MLA's, V4's, a dense student's) and the routed experts.
DEFAULT_LORA_TARGETS = ("*self_attn/*proj*", "*mlp/experts/*_proj")


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """Low-rank adapters (LoRA, Hu et al. 2021) on the linear weights whose path matches one of ``targets``.

    A targeted kernel ``W`` (``[*in, *out]``) gets ``lora_a [*in, rank]`` (PEFT's init: uniform in +-1/sqrt(fan_in))
    and ``lora_b [rank, *out]`` (zeros), fp32, and the layer computes ``x @ W + (alpha / rank) (x @ A) @ B``; a
    routed expert stack ``[E, *in, *out]`` gets one pair per expert. ``targets``: ``fnmatch`` globs (``*`` also
    crosses '/') over the '/'-joined path of a linear layer (``moe_layers/self_attn/q_b_proj``) or of an expert
    stack (``moe_layers/mlp/experts/gate_proj``): a parameter's path without its trailing ``/kernel``.
    ``dropout``: PEFT's ``lora_dropout``, on the adapters' input only (``(dropout(x) @ A) @ B``), in a call given a
    ``lora_dropout`` rng (training); none without one."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank}: expected >= 1")
        if not self.targets:
            raise ValueError("LoRA: no targets")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout {self.dropout}: expected a probability in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def applies(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pat) for pat in self.targets)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to run a model.

    dtype: compute dtype of activations and matmul inputs ("float32", "bfloat16").
    param_dtype: dtype params are created in by ``init`` (master weights; "float32" by default).
    remat: rematerialization policy of each scanned block: "none", "full" (save nothing), "dots" (save
        matmul outputs), "dots_no_batch" (save matmul outputs without batch dims).
    scan_unroll: ``unroll`` of the layer scans (1 = a loop; the layer count = fully unrolled).
    moe_dispatch: the grouped GEMM of the routed experts (``moe/grouped.py``): "blocked" (rows sorted by expert into
        fixed-size blocks, one expert per block, empty blocks skipped: sparse on every backend), "ragged"
        (``jax.lax.ragged_dot``: the TPU's grouped GEMM; XLA:CPU, and by report jaxlib 0.10's GPU backend,
        expand it into a dense matmul per expert), "gather" (each row gathers its expert's weights: for steps
        with fewer rows than experts), "dense" (every expert on every row: a test reference). "auto": "gather"
        when a device's step has fewer token-expert rows than experts (small-batch decode), else "ragged" on
        TPU and "blocked" elsewhere.
    moe_block_size: rows per block for "blocked" (None: chosen from the token count).
    capacity_factor: None (dropless, the default) or c > 0: under expert parallelism each device sends at most
        ``ceil(c * rows / EP)`` of an exchange's rows to each peer, shared max-min fairly over the peer's experts,
        and drops the rest (``moe/expert_parallel.py``), counted per expert in the router statistics' ``dropped``.
    moe_exchange_rows: under expert parallelism, the most rows one all-to-all exchange may have to receive on a
        device (its worst-case buffer, ``EP x rows sent per device``). A device's tokens are exchanged in as few
        equal chunks as keep under it, one after another, each rematerialized in the backward, so the MoE's
        dispatch buffers follow the chunk, not the batch (at 64 x 4096 tokens of V3 on ``expert=8`` a single
        exchange would receive up to 262,144 rows, 3.5 GiB per buffer). None: one exchange.
    moe_keep_received: in a layer that is not itself rematerialized (the MTP block; every layer with remat
        "none"), the exchange chunks keep their received rows for the backward pass, so the rows are not sent
        to the experts again there: one dispatch-sized all-to-all less per chunk, for the rows held from the
        layer's forward to its backward (EP x a device's rows x hidden: 3.5 GiB for V3 at 4,096 tokens a chip
        on ``expert=8``). A rematerialized layer's recomputation would run the exchange anyway: no effect there.
    platform: the backend the step is compiled for ("cpu", "gpu", "tpu"); None: JAX's default backend.
        ``deepseek-jax plan`` sets it when it compiles for a TPU topology from another machine.
    matmul: the recipe behind the one dot_general hook ("default" or "fp8").
    attention: the attention core (``layers/attention/``): "blockwise" (online softmax with its own backward, O(T x
        block) memory), "naive" (the whole score matrix: the reference), "splash" (the Pallas TPU splash kernel
        for a row's causal self-attention; off TPU it runs in Pallas' interpreter, for tests), "cudnn"
        (``jax.nn.dot_product_attention``'s cuDNN flash attention for a row's causal self-attention, V padded to
        the q/k head dim; rows packed with several documents take the blockwise core; off GPU it runs XLA's
        implementation, for tests), "auto" (whenever the queries or keys span more than ``attention_block``, for a
        row's self-attention: splash on TPU, cudnn on GPU in bf16 / fp16; blockwise otherwise).
    attention_block: query / key block of the blockwise core.
    indexer_loss: DeepSeek-V3.2's indexer training (``layers/mla.py``): None (inference; the indexer only selects),
        "warmup" (the dense warm-up stage: attention runs densely and each layer adds the KL from the main
        attention's distribution over the visible keys, summed over heads and L1-normalized, to the indexer's),
        "sparse" (the sparse stage: top-k attention, the indexer's input detached from the main loss, the KL over
        the selected keys). The KL sums are sown into the ``indexer_kl`` collection.
    fp8_weight_matmul: how a linear layer multiplies by an FP8-kept kernel (``quant/weights.py``'s ``Fp8Weight``):
    "pallas"
        (``quant/kernel.py``: a Pallas kernel that dequantizes each 128x128 block inside the matmul; off TPU it runs in
        Pallas' interpreter, for tests), "xla" (dequantize, then XLA's dot), "auto" ("pallas" on TPU, else "xla").
        Shapes the kernel does not tile (K or N not a multiple of 128) take the XLA path.
    lora: low-rank adapters on the linear weights ``LoraOptions.targets`` names (``layers/lora.py``); None: none.
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1
    moe_dispatch: str = "auto"
    moe_block_size: Optional[int] = None
    capacity_factor: Optional[float] = None
    moe_exchange_rows: Optional[int] = 65536
    moe_keep_received: bool = False
    platform: Optional[str] = None
    matmul: str = "default"
    attention: str = "auto"
    attention_block: int = 512
    indexer_loss: Optional[str] = None
    fp8_weight_matmul: str = "auto"
    lora: Optional[LoraOptions] = None

    def __post_init__(self):
        for name, allowed in (("remat", REMAT_POLICIES), ("moe_dispatch", MOE_DISPATCHES), ("matmul", MATMUL_RECIPES),
                              ("attention", ATTENTIONS), ("fp8_weight_matmul", FP8_WEIGHT_MATMULS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelOptions.{name} = {getattr(self, name)!r}: expected one of {allowed}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"ModelOptions.{name} = {getattr(self, name)!r}: not a dtype") from None
        if self.indexer_loss not in (None, "warmup", "sparse"):
            raise ValueError(f"ModelOptions.indexer_loss = {self.indexer_loss!r}: expected None, 'warmup' or 'sparse'")
        if self.scan_unroll < 1:
            raise ValueError(f"ModelOptions.scan_unroll = {self.scan_unroll}: expected >= 1")
        if self.attention_block < 1:
            raise ValueError(f"ModelOptions.attention_block = {self.attention_block}: expected >= 1")
        if self.moe_block_size is not None and self.moe_block_size < 1:
            raise ValueError(f"ModelOptions.moe_block_size = {self.moe_block_size}: expected >= 1")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"ModelOptions.capacity_factor = {self.capacity_factor}: expected None or > 0")
        if self.moe_exchange_rows is not None and self.moe_exchange_rows < 1:
            raise ValueError(f"ModelOptions.moe_exchange_rows = {self.moe_exchange_rows}: expected None or >= 1")
        if self.platform not in PLATFORMS:
            raise ValueError(f"ModelOptions.platform = {self.platform!r}: expected one of {PLATFORMS}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def target_platform(self) -> str:
        return self.platform or jax.default_backend()

    def grouped_impl(self, rows: int, groups: int) -> str:
        """The grouped GEMM for a step whose device sees ``rows`` token-expert rows over ``groups`` experts."""
        if self.moe_dispatch != "auto":
            return self.moe_dispatch
        if rows < groups:
            return "gather"
        return "ragged" if self.target_platform() == "tpu" else "blocked"

    def replace(self, **changes) -> "ModelOptions":
        return dataclasses.replace(self, **changes)


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy for a ``ModelOptions.remat`` name (None for "full": save nothing)."""
    cp = jax.checkpoint_policies
    return {
        "full": None,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
    }[name]
