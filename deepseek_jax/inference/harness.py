"""The model behind lm-evaluation-harness's ``deepseek-jax`` (registered by ``deepseek_jax/lm_eval.py``, which
describes it): lm-eval's ``TemplateLM`` over a checkpoint, scoring with ``inference/scoring.py``'s forward and
generating with ``generate``. Needs lm-eval (``pip install -e ".[eval]"``)."""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np
from lm_eval.api.model import TemplateLM


class DeepSeekLM(TemplateLM):
    """lm-eval's ``LM`` over a ``deepseek_jax`` checkpoint (see the module docstring)."""

    def __init__(self, pretrained: str, tokenizer: Optional[str] = None, batch_size=1,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, dtype: Optional[str] = None,
                 mesh: Optional[str] = None, **unused):
        super().__init__()
        from deepseek_jax.checkpoint.load import load_pretrained
        from deepseek_jax.config.options import ModelOptions
        from deepseek_jax.data.tokenizer import Tokenizer, load_tokenizer
        from deepseek_jax.inference.generation import default_options
        from deepseek_jax.parallel.mesh import make_mesh

        if unused:
            print(f"deepseek-jax: ignoring model arguments {sorted(unused)}", file=sys.stderr)
        self.batch_size = int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 8
        self.mesh = make_mesh(mesh) if mesh else None
        self.options = ModelOptions(dtype=dtype) if dtype else default_options()
        self.config, self.params = load_pretrained(pretrained, dtype=self.options.dtype, mesh=self.mesh)
        self.tok = Tokenizer(tokenizer) if tokenizer else load_tokenizer(pretrained)
        self.max_length = int(max_length or min(self.config.max_position_embeddings, 4096))
        self.max_gen_toks = int(max_gen_toks)
        self.pretrained = pretrained

    # ----- what TemplateLM needs --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.path)

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_bos=False)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    def _score(self, sequences: list[tuple[list[int], int]], desc: str, disable_tqdm: bool):
        """Per ``(tokens, n)``: the summed log-probability of its last ``n`` tokens given those before, and
        whether each is the argmax. ``tokens`` are cut from the left to ``max_length + 1``."""
        from tqdm import tqdm

        from deepseek_jax.inference.scoring import packed_logprobs

        t = self.max_length
        items = []
        for k, (tokens, n) in enumerate(sequences):
            tokens = np.asarray(tokens[-(t + 1):], np.int32)
            weight = np.zeros(tokens.size - 1, np.int32)
            weight[tokens.size - 1 - min(n, tokens.size - 1):] = 1  # the continuation's targets (none if n = 0)
            items.append({"inputs": tokens[:-1], "targets": tokens[1:], "weight": weight,
                          "request": np.full(tokens.size - 1, k, np.int32)})
        logp_sum = np.zeros(len(items))
        greedy = np.ones(len(items), bool)
        with tqdm(total=len(items), desc=desc, disable=disable_tqdm) as bar:
            for batch, logp, top in packed_logprobs(self.config, self.params, items, seq_len=t,
                                                    batch_size=self.batch_size, options=self.options, mesh=self.mesh):
                real = batch["inputs_segment_ids"] > 0
                keep = real & (batch["weight"] > 0)
                np.add.at(logp_sum, batch["request"][keep], logp[keep])
                np.logical_and.at(greedy, batch["request"][keep], top[keep])
                bar.update(len(np.unique(batch["request"][real])))
        return logp_sum, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        bos = self.prefix_token_id
        sequences = []
        for _, context, continuation in requests:
            tokens = list(context) + list(continuation)
            if not tokens or tokens[0] != bos:
                tokens = [bos] + tokens
            sequences.append((tokens, len(continuation)))
        logp, greedy = self._score(sequences, "deepseek-jax loglikelihood", disable_tqdm)
        out = [(float(lp), bool(g)) for lp, g in zip(logp, greedy)]
        for (pair, _, _), result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for k, req in enumerate(requests):
            (string,) = req.args
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((list(context) + list(target), len(target)))
                owner.append(k)
        logp, _ = self._score(windows, "deepseek-jax loglikelihood_rolling", disable_tqdm)
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owner, np.int64), logp)
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(x) for x in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        from deepseek_jax.inference.generation import generate
        from deepseek_jax.inference.sampling import SamplingParams

        out = [None] * len(requests)
        groups: dict = {}  # one generate call per batch of requests with the same settings
        for k, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", True) else 0.0
            key = (tuple(until), max_new, temperature)
            groups.setdefault(key, []).append((k, context))
        with tqdm(total=len(requests), desc="deepseek-jax generate_until", disable=disable_tqdm) as bar:
            for (until, max_new, temperature), items in groups.items():
                for i in range(0, len(items), self.batch_size):
                    chunk = items[i:i + self.batch_size]
                    prompts = [[self.prefix_token_id] + self.tok_encode(c)[-(self.max_length - max_new - 1):]
                               for _, c in chunk]
                    result = generate(self.config, self.params, prompts, max_new_tokens=max_new,
                                      sampling=SamplingParams(temperature=temperature), eos_token_id=self.tok.eos_id,
                                      stop_strings=until, tokenizer=self.tok, options=self.options, mesh=self.mesh)
                    for (k, context), text in zip(chunk, result.texts):
                        for stop in until:  # generate stops at a stop string; the text is cut before it
                            text = text.split(stop)[0]
                        out[k] = text
                        self.cache_hook.add_partial("generate_until", (context, requests[k].args[1]), text)
                    bar.update(len(chunk))
        return out
