"""Hyper-parameters of a training run (the architecture is the ``ModelConfig``; how it runs, ``ModelOptions``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import DEFAULT_LORA_TARGETS, LoraOptions, ModelOptions

PRECISIONS = ("fp32", "bf16", "fp8")
OPTIMIZERS = ("adamw", "muon")
V3_SEQUENCE_BALANCE_ALPHA = 1e-4  # DeepSeek-V3 report, section 4.2


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
    optimizer: str = "adamw"  # or "muon": Muon for the hidden linear weights, AdamW for the rest (V4's recipe)
    fsdp_over_data: bool = False  # shard weights and optimizer state over `data` too (ZeRO-3), not just fsdp x expert
    precision: str = "fp32"
    remat: str = "none"
    max_bad_steps: int = 5  # consecutive non-finite steps (each skipped) that stop the run
    moe_dispatch: str = "auto"  # ModelOptions.moe_dispatch
    capacity_factor: Optional[float] = None  # ModelOptions.capacity_factor (None: dropless)
    moe_keep_received: bool = False  # ModelOptions.moe_keep_received
    attention: str = "auto"  # ModelOptions.attention
    attention_block: int = 512  # ModelOptions.attention_block
    # DeepSeek-V3.2's indexer training (ModelOptions.indexer_loss): None, "warmup" (only the indexer trains, by its
    # KL to the dense attention) or "sparse" (everything trains on top-k attention, the indexer by its KL)
    indexer_stage: Optional[str] = None
    indexer_loss_weight: float = 1.0
    train_only: tuple[str, ...] = ()  # globs over '/'-joined param paths: only these are updated (all if empty)
    freeze: tuple[str, ...] = ()  # globs of params that are never updated
    # LoRA (ModelOptions.lora): rank 0 is off; else only the adapters train (the base and everything else stay as
    # they are, the router biases included), and only they have optimizer state. Targets: globs over the linear
    # layers' paths (empty: config/options.py's DEFAULT_LORA_TARGETS).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    lora_base: Optional[str] = None  # the base checkpoint (set by fit from init_from): LoRA checkpoints point at it
    # QLoRA: the base's FP8 kernels stay as stored (e4m3 + 128x128 block scales, ``quant/weights.py``'s Fp8Weight;
    # V4's FP4 experts as Fp4Weight), dequantized where each matmul reads them; needs lora_rank and an FP8 base
    fp8_base: bool = False
    # dropout on the adapters' input (PEFT's lora_dropout): the base's matmul sees the whole input
    lora_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("train_only", "freeze", "lora_targets"):  # JSON round trips give lists
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: expected one of {OPTIMIZERS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {PRECISIONS}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank {self.lora_rank}: expected >= 0 (0: no LoRA)")
        if (self.fp8_base or self.lora_dropout) and not self.lora_rank:
            raise ValueError("fp8_base and lora_dropout are LoRA settings: set lora_rank too")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout {self.lora_dropout}: expected a probability in [0, 1)")
        if self.lora_rank and self.train_only:
            raise ValueError("LoRA trains only its adapters: choose them with lora_targets, not train_only")
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

    def model_options(self, precision: Optional[str] = None, lora: bool = True) -> ModelOptions:
        """fp32: everything fp32. bf16: fp32 master weights, bf16 compute. fp8: bf16 compute with DeepSeek's
        E4M3 tile/block recipe on every linear layer's GEMMs. Under LoRA the frozen base is held in the compute
        dtype (bf16 for bf16 and fp8) and only the adapters are fp32. ``precision``: another than the run's (a
        distillation teacher's); ``lora``: with the run's adapters (a teacher has none)."""
        precision = self.precision if precision is None else precision
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
        dtype = "float32" if precision == "fp32" else "bfloat16"
        matmul = "fp8" if precision == "fp8" else "default"
        # A LoRA base is frozen: it stays in the compute dtype (no fp32 master copy); the adapters are fp32.
        param_dtype = dtype if self.lora_rank and lora else "float32"
        return ModelOptions(dtype=dtype, param_dtype=param_dtype, remat=self.remat, matmul=matmul,
                            moe_dispatch=self.moe_dispatch, capacity_factor=self.capacity_factor,
                            moe_keep_received=self.moe_keep_received, attention=self.attention,
                            attention_block=self.attention_block, indexer_loss=self.indexer_stage,
                            lora=self.lora_options() if lora else None)

    def lora_options(self) -> Optional[LoraOptions]:
        if not self.lora_rank:
            return None
        return LoraOptions(self.lora_rank, self.lora_alpha, self.lora_targets or DEFAULT_LORA_TARGETS,
                           dropout=self.lora_dropout)
