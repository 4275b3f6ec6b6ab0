"""LoRA in GRPO: the adapted policy as plain weights, for the sampler.

Under LoRA (``TrainConfig.lora_rank``) the trainer's params are the frozen base with adapters beside the targeted
kernels, run by the LoRA-aware model (``layers/lora.py``); only the adapters train and are checkpointed, and the
work directory's ``train_config.json`` names the base (``lora_base``), as in ``training/run.py``'s ``fit``.
``generate`` (GRPO's rollouts, the held-out greedy evaluations) runs the plain model, whose params have no place
for adapters: it is given ``merged`` weights, the adapters folded into their kernels.
"""

from __future__ import annotations

from functools import partial

import jax

from deepseek_jax.layers.lora import fold_adapters, merge


@partial(jax.jit, static_argnames="scale")
def _merged_kernel(kernel, a, b, scale: float):
    return merge({"kernel": kernel, "lora_a": a, "lora_b": b}, scale)["kernel"]


def merged(params, scale: float):
    """``params`` (base + adapters) as the plain model's weights: each adapted kernel replaced by
    ``kernel + scale * a @ b`` (``layers/lora.py``'s ``merge``, summed in fp32, stored in the kernel's dtype), in
    the kernel's shards. Only the targeted kernels are new arrays (one jitted merge each; a jit over the whole
    tree would copy every other leaf too): the untargeted leaves are the same arrays as in ``params``."""
    return fold_adapters(params, lambda kernel, a, b: _merged_kernel(kernel, a, b, scale))
