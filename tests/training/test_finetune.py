"""Fine-tuning (deepseek_jax.train_cli --init-from, data.tokenize_chats, optimizer.trainable_by_patterns,
convert.export of a train work directory) on a checkpoint that transformers wrote."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from convert_fixtures import make_hf, read_all
from tiny_inference import word_chats, word_tokenizer

import deepseek_jax as dsj
from deepseek_jax.cli import main
from deepseek_jax.data import chat_template as chat
from deepseek_jax.data import corpus as data_corpus
from deepseek_jax.data import packing
from deepseek_jax.data.tokenizer import EOS_TOKEN
from deepseek_jax.training.optimizer import trainable_by_patterns

# All layers MoE (the dense MLP path is covered elsewhere), one of them: the step compiles in seconds.
CONFIG = dsj.presets["tiny-v3"].replace(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)


_conversations = word_chats


def _write_jsonl(path, chats):
    with open(path, "w") as f:
        for msgs in chats:
            f.write(json.dumps({"messages": msgs}) + "\n")


def _hf_tokenizer(directory):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))


def _expected_mask(tok, messages, style):
    """Independently of ``render_with_spans``: find each assistant turn's text in the rendered string by search,
    and mark the tokens (from the tokenizer's offsets) that start inside ``content + EOS``."""
    text = chat.render(messages, style, add_generation_prompt=False)
    enc = tok.encode(text, add_special_tokens=False)
    mask = np.zeros(len(enc.ids), bool)
    at = 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        marker = chat.ASSISTANT if style != "v2" else "Assistant:"
        start = text.index(marker + (" " if style == "v2" else "") + m["content"] + EOS_TOKEN, at) + len(marker)
        end = start + len(m["content"]) + len(EOS_TOKEN) + (1 if style == "v2" else 0)
        mask |= np.array([start <= a < end for a, _ in enc.offsets])
        at = end
    return enc.ids, mask


@pytest.mark.parametrize("style", ["v3", "v2"])
def test_chat_loss_mask_is_exactly_the_assistant_tokens(tmp_path, style):
    word_tokenizer(tmp_path)
    tok = _hf_tokenizer(tmp_path)
    chats = _conversations(6, seed=1)
    _write_jsonl(tmp_path / "chat.jsonl", chats)
    expected = [_expected_mask(tok, m, style) for m in chats]
    ids = sum((i for i, _ in expected), [])
    mask = np.concatenate([m for _, m in expected])
    # One row holds the whole corpus (unshuffled, documents in file order) and some padding.
    ds = packing.make_dataset(str(tmp_path / "chat.jsonl"), seq_len=len(ids) + 3, batch_size=1, tokenizer=tok,
                        shuffle=False, chat_style=style)
    b = next(ds)
    n = len(ids)
    assert b["inputs"][0, :n].tolist() == ids and ids[0] == tok.token_to_id("<｜begin▁of▁sentence｜>")
    # Targets are the inputs shifted by one: target t counts exactly when token t + 1 is the assistant's.
    np.testing.assert_array_equal(b["loss_mask"][0, :n - 1], mask[1:].astype(np.float32))
    assert b["loss_mask"][0, n - 1:].sum() == 0  # padding after the corpus
    # The same, read off by hand: each assistant turn's word ids, then the end-of-sentence id.
    trained = b["targets"][0][b["loss_mask"][0] > 0].tolist()
    eos = tok.token_to_id(EOS_TOKEN)
    want = []
    for messages in chats:
        for m in messages:
            if m["role"] == "assistant":
                want += [tok.token_to_id(w) for w in m["content"].split()] + [eos]
    assert trained == want


def test_malformed_chat_jsonl_names_file_and_line(tmp_path):
    word_tokenizer(tmp_path)
    tok = _hf_tokenizer(tmp_path)
    good = json.dumps({"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]})
    cases = {
        "{not json": r"bad\.jsonl:2: invalid JSON",
        json.dumps({"text": "w1"}): r"bad\.jsonl:2: expected an object with a 'messages' list",
        json.dumps({"messages": [{"role": "bot", "content": "w1"}]}): r"bad\.jsonl:2: message 0: role 'bot'",
        json.dumps({"messages": [{"role": "user", "content": 3}]}): r"bad\.jsonl:2: message 0: 'content' must be",
        json.dumps({"messages": [{"role": "user", "content": "w1"}]}): r"bad\.jsonl:2: no assistant message",
        json.dumps({"messages": []}): r"bad\.jsonl:2: 'messages' must be a non-empty list",
    }
    for line, pattern in cases.items():
        (tmp_path / "bad.jsonl").write_text(good + "\n" + line + "\n")
        with pytest.raises(data_corpus.DataError, match=pattern):
            packing.make_dataset(str(tmp_path / "bad.jsonl"), seq_len=8, batch_size=1, tokenizer=tok)


def test_trainable_patterns_select_by_path():
    import flax.linen as nn
    import jax.numpy as jnp

    shapes = nn.meta.unbox(jax.eval_shape(dsj.Transformer(CONFIG).init, jax.random.PRNGKey(0),
                                          jnp.zeros((1, 2), jnp.int32))["params"])
    flags = trainable_by_patterns(shapes, train_only=("*/experts/*",))
    picked = sum(x.size for x, t in zip(jax.tree.leaves(shapes), jax.tree.leaves(flags)) if t)
    c = CONFIG  # routed experts only: layers x experts x (gate + up + down), by hand
    assert picked == c.num_hidden_layers * c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size
    flags = trainable_by_patterns(shapes, freeze=("embed_tokens/*", "lm_head/*"))
    frozen = sum(x.size for x, t in zip(jax.tree.leaves(shapes), jax.tree.leaves(flags)) if not t)
    assert frozen == 2 * c.vocab_size * c.hidden_size
    with pytest.raises(ValueError, match=r"--train-only '\*expert_s\*' matches no parameter"):
        trainable_by_patterns(shapes, train_only=("*expert_s*",))


def test_init_from_refuses_architecture_flags(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))
    from safetensors.numpy import save_file

    save_file({"model.norm.weight": np.ones(CONFIG.hidden_size, np.float32)}, str(ckpt / "model.safetensors"))
    base = ["train", "--init-from", str(ckpt), "--workdir", str(tmp_path / "run")]
    assert main(base + ["--preset", "tiny-v3"]) == 2
    assert "--preset cannot be combined with --init-from" in capsys.readouterr().err
    assert main(base + ["--set", "hidden_size=128"]) == 2
    assert "--set hidden_size=128 conflicts with --init-from" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----- end to end: transformers checkpoint -> 20 SFT steps -> export -> transformers ---------------------
# Only attention and the experts train (the router, norms outside attention, embedding and head stay frozen).
STEPS = 20


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    src = str(root / "hf")
    make_hf(src, CONFIG, mtp=False)
    word_tokenizer(root / "hf")
    chats = _conversations(24)
    _write_jsonl(root / "chat.jsonl", chats)
    work = str(root / "run")
    rc = main(["train", "--init-from", src, "--data", str(root / "chat.jsonl"), "--workdir", work,
               "--steps", str(STEPS), "--batch-size", "8", "--seq-len", "32", "--lr", "1e-2", "--warmup", "2",
               "--save-every", str(STEPS), "--train-only", "*experts*", "--train-only", "*self_attn*"])
    assert rc == 0
    out = str(root / "exported")
    assert main(["export", work, out, "--no-progress"]) == 0
    return {"src": src, "work": work, "out": out, "chats": chats}


def _assistant_loss(model, tok, chats) -> float:
    """Mean next-token cross-entropy of transformers ``model`` on the assistant tokens (``_expected_mask``)."""
    total = n = 0.0
    for messages in chats:
        ids, mask = _expected_mask(tok, messages, "v3")
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()
        nll = -logp[np.arange(len(ids) - 1), ids[1:]]
        total, n = total + nll[mask[1:]].sum(), n + mask[1:].sum()
    return total / n


@pytest.mark.slow  # the fixture compiles a train step: ~30 s on 2 cores
def test_sft_lowers_the_loss_on_the_assistant_tokens(finetuned):
    from transformers import AutoModelForCausalLM

    with open(os.path.join(finetuned["work"], "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == STEPS
    tok = _hf_tokenizer(finetuned["src"])
    # Measured by transformers on the whole chat set, before (the source) and after (the export).
    before, after = (_assistant_loss(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), tok,
                                     finetuned["chats"]) for d in (finetuned["src"], finetuned["out"]))
    assert after < before - 0.5, (before, after)  # measured: 6.22 -> 5.39
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses  # measured: 6.24 -> 5.47


@pytest.mark.slow  # the fixture compiles a train step: ~30 s on 2 cores
def test_frozen_params_are_bit_identical_and_the_others_changed(finetuned):
    src, out = read_all(finetuned["src"]), read_all(finetuned["out"])
    assert set(src) == set(out)
    trained = [k for k in src if "experts" in k or "self_attn" in k]
    frozen = [k for k in src if k not in trained]
    assert any("embed_tokens" in k for k in frozen) and any("mlp.gate.weight" in k for k in frozen)
    for k in frozen:  # the router's bias too: frozen patterns turn off its balancing update
        assert torch.equal(src[k], out[k]), k
    for k in trained:  # every one: gradients, or at least weight decay for experts that got no token
        assert not torch.equal(src[k], out[k]), k


@pytest.mark.slow  # the fixture compiles a train step: ~30 s on 2 cores
def test_export_loads_in_transformers_with_our_logits(finetuned):
    from transformers import AutoModelForCausalLM

    from deepseek_jax.checkpoint.load import pretrained_config

    config, params = dsj.load_pretrained(finetuned["work"])
    assert config == pretrained_config(finetuned["src"])  # the checkpoint's own config, unchanged
    tokens = np.random.RandomState(0).randint(0, CONFIG.vocab_size, (2, 12)).astype(np.int32)
    ours = np.asarray(dsj.Transformer(config).apply({"params": params}, tokens))
    model = AutoModelForCausalLM.from_pretrained(finetuned["out"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert os.path.exists(os.path.join(finetuned["out"], "tokenizer.json"))


SHARDED_INIT = r"""
import json, sys
import jax, numpy as np
import deepseek_jax as dsj
from deepseek_jax.checkpoint.load import pretrained_config
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.run import init_params
from deepseek_jax.training.trainer import Trainer
path = sys.argv[1]
trainer = Trainer(pretrained_config(path), TrainConfig(), make_mesh("fsdp=2,expert=4"))
params = init_params(path, trainer)
_, ref = dsj.load_pretrained(path, mesh=make_mesh(None, jax.devices()[:1]))
experts = params["moe_layers"]["mlp"]["experts"]["gate_proj"]
print("RESULT " + json.dumps({
    "equal": all(np.array_equal(np.asarray(a), np.asarray(b, np.float32))
                 for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref))),
    "same_shardings": all(a.sharding == s for a, s in zip(jax.tree.leaves(params),
                                                            jax.tree.leaves(trainer.param_shardings))),
    "dtypes": sorted({str(a.dtype) for a in jax.tree.leaves(params)}),
    "expert_spec": [str(x) for x in experts.sharding.spec], "expert_shards": len(experts.addressable_shards),
}))
"""


def test_init_from_loads_straight_into_the_runs_shardings(tmp_path):
    """On 8 simulated devices, ``init_params`` of a bf16 HF directory gives the run's shardings, fp32 master
    weights, and the values of the unsharded load."""
    import subprocess
    import sys

    make_hf(str(tmp_path / "hf"), CONFIG, mtp=False, dtype=torch.bfloat16)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helpers
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SHARDED_INIT, str(tmp_path / "hf")], env=env, capture_output=True,
                          text=True, timeout=600, cwd=here)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert out["equal"] and out["same_shardings"] and out["dtypes"] == ["float32"]
    assert out["expert_spec"] == ["None", "expert", "fsdp", "None"] and out["expert_shards"] == 8


def test_mtp_off_freezes_the_mtp_modules():
    from deepseek_jax.parallel.mesh import make_mesh
    from deepseek_jax.training.config import TrainConfig
    from deepseek_jax.training.trainer import Trainer

    config = dsj.presets["tiny-v3"]  # one MTP module
    mesh = make_mesh(None, jax.devices()[:1])
    on = Trainer(config, TrainConfig(), mesh)
    off = Trainer(config, TrainConfig(mtp_weight=0.0), mesh)
    assert on.trainable is None  # nothing frozen: the optimizer is the plain one
    flags = {jax.tree_util.keystr(p): t for p, t in jax.tree_util.tree_leaves_with_path(off.trainable)}
    assert flags and all(t == (not k.startswith("['mtp_0']")) for k, t in flags.items())
    from deepseek_jax.models.counts import param_counts

    counts = param_counts(config)
    assert off.trainable_count() == (counts["main"], counts["main"] + counts["mtp_0"])
