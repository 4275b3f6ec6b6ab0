"""Scoring documents: the log-likelihood of every next token, for ``deepseek-jax eval``'s perplexity and bits per byte.

Each document is scored on its own, as ``[BOS] + ids + [EOS]`` (either marker left out when the tokenizer has
none): its next-token pairs. Documents are packed into rows by Grain's first-fit packer, each with its own segment
id, so that attention stays within a document (the training forward's segment mask) and no row is mostly padding;
a document of more than ``seq_len`` pairs is scored in pieces of ``seq_len``, each piece on its own (its first
tokens see only that piece). The forward is the training one (``Transformer`` in "train" mode, dropless MoE),
on one device or sharded over a mesh by the training rules, rows over the batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.inference.generation import place_params
from deepseek_jax.models.transformer import Transformer
from deepseek_jax.parallel.mesh import mesh_context
from deepseek_jax.parallel.rules import batch_sharding


@dataclasses.dataclass
class Score:
    """Summed negative log-likelihood (nats) over ``tokens`` predicted tokens of ``documents`` documents."""

    nll: float = 0.0
    tokens: int = 0
    documents: int = 0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    def bits_per_byte(self, n_bytes: int) -> float:
        """Bits per UTF-8 byte of the documents' text (``n_bytes`` of it)."""
        return self.nll / math.log(2) / n_bytes


@functools.partial(jax.jit, static_argnames=("config", "options"))
def token_logprobs(params, inputs, targets, positions, segment_ids, *, config, options):
    """``[B,T]`` each target's log-probability (fp32) and whether it is the argmax, from the training forward over
    packed rows (``segment_ids``: 0 for padding, else one id per document)."""
    logits = Transformer(config, options).apply({"params": params}, inputs, positions, segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def _pieces(documents: Iterable[np.ndarray], seq_len: int, score: Score):
    for ids in documents:
        ids = np.asarray(ids, np.int32)
        if ids.size < 2:
            continue
        score.documents += 1
        for a in range(0, ids.size - 1, seq_len):
            piece = ids[a:a + seq_len + 1]
            yield {"inputs": piece[:-1], "targets": piece[1:]}


def packed_logprobs(config: ModelConfig, params, items: list, *, seq_len: int, batch_size: int,
                    options: Optional[ModelOptions] = None, mesh=None):
    """Pack ``items`` (dicts of equal-length arrays of at most ``seq_len``, ``inputs`` and ``targets`` among them)
    into rows of ``seq_len`` with Grain's first-fit packer, one segment each, and yield per batch of ``batch_size``
    rows ``(batch, logp, top)``: the packed batch (``inputs_segment_ids``: 0 for padding) and its targets'
    log-probabilities and argmax flags ``[rows, seq_len]`` (``token_logprobs``). The last batch is padded to
    ``batch_size`` rows for the device (one compiled shape) and given back without them. ``mesh``: params placed
    by the training rules, rows over the batch axes (``batch_size`` must divide over them)."""
    import grain
    from grain.experimental import FirstFitPackIterDataset

    options = options or ModelOptions()
    if mesh is not None:
        params = place_params(config, params, mesh)
    rows = FirstFitPackIterDataset(grain.MapDataset.source(items).to_iter_dataset(),
                                   length_struct={k: seq_len for k in items[0]} if items else {},
                                   num_packing_bins=batch_size, shuffle_bins=False)
    for batch in rows.batch(batch_size, drop_remainder=False) if items else ():
        b = batch["inputs"].shape[0]
        arrays = [np.concatenate([x, np.zeros((batch_size - b, seq_len), x.dtype)]).astype(np.int32)
                  for x in (batch["inputs"], batch["targets"], batch["inputs_positions"], batch["inputs_segment_ids"])]
        if mesh is not None:
            arrays = [jax.device_put(x, batch_sharding(mesh)) for x in arrays]
        with mesh_context(mesh):
            logp, top = token_logprobs(params, *arrays, config=config, options=options)
        yield batch, np.asarray(logp, np.float64)[:b], np.asarray(top)[:b]


def score_documents(config: ModelConfig, params, documents: Iterable, *, seq_len: int, batch_size: int,
                    options: Optional[ModelOptions] = None, mesh=None, progress=None) -> Score:
    """The summed next-token negative log-likelihood of ``documents`` (each a sequence of ids, BOS and EOS
    included), scored in batches of ``batch_size`` rows of ``seq_len`` tokens (see the module docstring and
    ``packed_logprobs``). ``progress``: a callable given each batch's count of predicted tokens (a progress bar's
    ``update``)."""
    score = Score()
    items = list(_pieces(documents, seq_len, score))
    for batch, logp, _ in packed_logprobs(config, params, items, seq_len=seq_len, batch_size=batch_size,
                                          options=options, mesh=mesh):
        real = batch["inputs_segment_ids"] > 0
        score.nll -= float(logp[real].sum())
        score.tokens += int(real.sum())
        if progress is not None:
            progress(int(real.sum()))
    return score
