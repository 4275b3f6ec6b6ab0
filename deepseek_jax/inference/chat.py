"""A multi-turn chat session over ``generate``, with the chat templates of ``data/chat_template.py``."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from deepseek_jax.data.chat_template import THINK_OPEN, default_style, render
from deepseek_jax.inference.generation import generate


@dataclasses.dataclass
class ChatSession:
    """A conversation: ``send(user_text)`` renders the whole history, generates, and records the reply.

    Each turn prefills the whole conversation again (no cache reuse across turns yet).
    """

    config: object
    params: object
    tokenizer: object
    style: Optional[str] = None
    system: Optional[str] = None
    generate_kwargs: dict = dataclasses.field(default_factory=dict)
    messages: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.style = self.style or default_style(self.config)
        if self.system:
            self.messages.append({"role": "system", "content": self.system})

    def prompt_ids(self) -> list[int]:
        return self.tokenizer.encode(render(self.messages, self.style), add_bos=False)

    def send(self, text: str, on_text: Optional[Callable[[str], None]] = None):
        """Add a user turn, generate the reply (streamed to ``on_text``) and return the ``GenerationResult``."""
        self.messages.append({"role": "user", "content": text})
        kwargs = dict(self.generate_kwargs)
        kwargs.setdefault("eos_token_id", self.tokenizer.eos_id if self.tokenizer.eos_id is not None
                          else self.config.eos_token_id)
        if self.style == "v2":
            kwargs.setdefault("stop_strings", ("User:",))
        on_token = (lambda e: e.text and on_text(e.text)) if on_text else None
        result = generate(self.config, self.params, [self.prompt_ids()], tokenizer=self.tokenizer,
                          on_token=on_token, **kwargs)
        reply = result.texts[0]
        if self.style == "r1":
            reply = THINK_OPEN + "\n" + reply  # the prompt opened the think block; keep the turn whole
        self.messages.append({"role": "assistant", "content": reply})
        return result
