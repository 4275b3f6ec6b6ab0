"""Chat templates for DeepSeek V3 / R1 (and V2) models and the R1-Distill students: prompt text, and the spans of
the assistant's turns that supervised fine-tuning trains on.

Template styles (what the released ``tokenizer_config.json`` chat templates produce for plain text turns;
tool calls are not supported):
  "v3": ``<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>...``,
        generation prompt ``<｜Assistant｜>``.
  "r1": as "v3", but earlier assistant turns keep only what follows their last ``</think>`` (the reasoning is
        not fed back), and the generation prompt opens the reasoning: ``<｜Assistant｜><think>\\n``.
  "v2": ``<｜begin▁of▁sentence｜>{system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}<｜end▁of▁sentence｜>...``,
        generation prompt ``Assistant:``.
Several system messages are joined with a blank line.
"""

from __future__ import annotations

from typing import Sequence

from deepseek_jax.data.tokenizer import BOS_TOKEN, EOS_TOKEN, stop_prefix_len

USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
STYLES = ("v3", "r1", "v2")


def strip_think(text: str) -> str:
    """What an R1 answer shows: the text after its last ``</think>`` (all of it if there is none)."""
    return text.rsplit(THINK_CLOSE, 1)[-1] if THINK_CLOSE in text else text


class ReasoningSplit:
    """Splits an R1 completion (which starts inside the ``<think>`` its prompt opened) into reasoning and answer,
    as DeepSeek's API splits ``reasoning_content`` from ``content``: the reasoning is what comes before the first
    ``</think>`` (all of it while there is none), the answer what follows it, its leading newlines dropped.
    ``feed(piece)`` takes a stream a piece at a time and returns the new ``(reasoning, answer)`` text, holding back
    a tail that could be the start of ``</think>`` until ``final``; a whole completion is one
    ``feed(text, final=True)``, and the pieces of any cut of it add up to the same."""

    def __init__(self):
        self.buffer, self.done, self.leading = "", False, True

    def _answer(self, piece: str) -> str:
        if self.leading:
            piece = piece.lstrip("\n")
            self.leading = not piece
        return piece

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        if self.done:
            return "", self._answer(piece)
        self.buffer += piece
        if THINK_CLOSE in self.buffer:
            reasoning, answer = self.buffer.split(THINK_CLOSE, 1)
            self.done, self.buffer = True, ""
            return reasoning, self._answer(answer)
        keep = 0 if final else stop_prefix_len(self.buffer, (THINK_CLOSE,))
        out, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return out, ""


def split_reasoning(text: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of a whole R1 completion, by ``ReasoningSplit``'s rule; a ``<think>`` that opens the
    text (a chat session's stored reply carries the one its prompt opened) is dropped first."""
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN):].lstrip("\n")
    return ReasoningSplit().feed(text, final=True)


def render(messages: Sequence[dict], style: str = "v3", add_generation_prompt: bool = True,
           bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN) -> str:
    """The prompt text for ``messages`` (``[{"role": "system"|"user"|"assistant", "content": str}]``)."""
    text, _ = render_with_spans(messages, style, add_generation_prompt, bos_token, eos_token)
    return text


def render_with_spans(messages: Sequence[dict], style: str = "v3", add_generation_prompt: bool = False,
                      bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN) -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: ``render``'s text and the ``[start, end)`` character spans of what the assistant says,
    the part supervised fine-tuning trains on.

    Each assistant turn's span is its content (for "r1", after ``strip_think``) followed by the end-of-sentence
    token that closes the turn; the role marker before it (``<｜Assistant｜>``, or ``Assistant:`` for "v2") is
    prompt, not answer. For "v2" the span starts right after ``Assistant:``, so it includes the space before
    the content: that is where generation from the ``Assistant:`` prompt starts writing.
    """
    if style not in STYLES:
        raise ValueError(f"chat style {style!r}: expected one of {STYLES}")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = [bos_token, system]
    spans = []
    at = len(bos_token) + len(system)

    def add(piece: str, answer: bool = False):
        nonlocal at
        out.append(piece)
        if answer:
            spans.append((at, at + len(piece)))
        at += len(piece)

    if style == "v2" and system:
        add("\n\n")
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            continue
        if role == "user":
            add(f"User: {content}\n\n" if style == "v2" else USER + content)
        elif role == "assistant":
            if style == "r1":
                content = strip_think(content)
            if style == "v2":
                add("Assistant:")
                add(f" {content}{eos_token}", answer=True)
            else:
                add(ASSISTANT)
                add(content + eos_token, answer=True)
        else:
            raise ValueError(f"message {i}: role {role!r} is not supported (expected system, user or assistant)")
    if add_generation_prompt:
        add({"v3": ASSISTANT, "r1": ASSISTANT + THINK_OPEN + "\n", "v2": "Assistant:"}[style])
    return "".join(out), spans


def default_style(config) -> str:
    """V2's own template, R1's for the dense R1-Distill students (whose released templates open ``<think>``),
    else V3's."""
    if config.model_type == "deepseek_v2":
        return "v2"
    return "v3" if config.uses_mla else "r1"
