"""lm-evaluation-harness's ``deepseek-jax`` model (``deepseek_jax/lm_eval.py``, ``inference/harness.py``) against
lm-eval's own ``hf`` model on the same transformers checkpoint, on local tasks (no downloads): a multiple-choice
task's accuracy and per-choice log-likelihoods, a rolling log-likelihood task's perplexities and a greedy
``generate_until`` task's outputs."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tiny_inference import tiny_checkpoint, word_tokenizer

lm_eval = pytest.importorskip("lm_eval")

TASKS = {
    "dsj_mc": """task: dsj_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "dsj_rolling": """task: dsj_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/docs.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "dsj_gen": """task: dsj_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["w7"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def _words(rng, n):
    return " ".join(f"w{rng.randrange(8, 300)}" for _ in range(n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two copies of the tiny V3 checkpoint with a word tokenizer, the tasks and their data. In ``ckpt`` the
    tokenizer's post-processor adds BOS, which ``hf`` asks for with ``add_bos_token=True``: its contexts and
    prompts then start with BOS, as ours always do. ``hf``'s rolling log-likelihood encodes the text the same way
    and puts its BOS prefix before that BOS, so it is compared on ``plain`` (no post-processor), where ``hf``'s
    windows are BOS + the text, as ours are."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    root = tmp_path_factory.mktemp("lm_eval")
    _, _, _, path = tiny_checkpoint("tiny-v3")
    ckpt, plain = root / "ckpt", root / "plain"
    for d in (ckpt, plain):
        shutil.copytree(path, d)
        word_tokenizer(d)
        config = json.loads((d / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    bos = "<｜begin▁of▁sentence｜>"
    tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                            special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(ckpt / "tokenizer.json"))
    rng = random.Random(0)
    data, tasks = root / "data", root / "tasks"
    data.mkdir()
    tasks.mkdir()
    with open(data / "mc.jsonl", "w") as f:
        for _ in range(8):
            f.write(json.dumps({"question": _words(rng, rng.randrange(1, 6)),
                                "choices": [_words(rng, rng.randrange(1, 4)) for _ in range(3)],
                                "answer": rng.randrange(3)}) + "\n")
    with open(data / "docs.jsonl", "w") as f:
        for n in (3, 40, 1, 90):  # longer than max_length=32: lm-eval's rolling windows
            f.write(json.dumps({"text": _words(rng, n)}) + "\n")
    with open(data / "gen.jsonl", "w") as f:
        for _ in range(4):
            f.write(json.dumps({"prompt": _words(rng, rng.randrange(2, 6)), "target": "w9"}) + "\n")
    for name, text in TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.format(data=data))
    return ckpt, plain, tasks


def _evaluate(model, model_args, tasks, names):
    from lm_eval.tasks import TaskManager

    import deepseek_jax  # noqa: F401  registers deepseek-jax

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names,
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    return out["results"], out["samples"]


def test_equals_lm_eval_hf_on_the_same_checkpoint(setup, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt, plain, tasks = setup
    ours, our_samples = _evaluate("deepseek-jax", f"pretrained={ckpt},batch_size=4,max_length=32", tasks,
                                  list(TASKS))
    hf = "batch_size=1,max_length=32,dtype=float32,device=cpu"
    ref, ref_samples = _evaluate("hf", f"pretrained={ckpt},{hf},add_bos_token=True", tasks, ["dsj_mc", "dsj_gen"])
    rolling, _ = _evaluate("hf", f"pretrained={plain},{hf}", tasks, ["dsj_rolling"])
    assert ours["dsj_mc"]["acc,none"] == ref["dsj_mc"]["acc,none"]
    ll = lambda samples: np.array([[r[0][0] for r in s["resps"]] for s in samples["dsj_mc"]])  # noqa: E731
    ours_ll, ref_ll = ll(our_samples), ll(ref_samples)
    assert ours_ll.shape == (8, 3) and np.all(ours_ll < 0)
    np.testing.assert_allclose(ours_ll, ref_ll, rtol=1e-3)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        np.testing.assert_allclose(ours["dsj_rolling"][metric], rolling["dsj_rolling"][metric], rtol=1e-3)
    ours_gen = [s["resps"][0][0] for s in our_samples["dsj_gen"]]
    assert ours_gen == [s["resps"][0][0] for s in ref_samples["dsj_gen"]] and any(ours_gen)


@pytest.mark.slow
def test_registered_on_import_and_runs_from_the_command_line(setup, tmp_path):
    """``python -m deepseek_jax.lm_eval`` is lm-eval's command line with the model registered; the built-in
    ``hf`` stays there."""
    ckpt, _, tasks = setup
    from lm_eval.api.registry import get_model

    import deepseek_jax  # noqa: F401

    assert get_model("deepseek-jax").__name__ == "DeepSeekLM" and get_model("hf").__name__ == "HFLM"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "deepseek_jax.lm_eval", "--model", "deepseek-jax", "--model_args",
                           f"pretrained={ckpt},max_length=32", "--tasks", "dsj_mc", "--include_path", str(tasks),
                           "--output_path", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dsj_mc" in proc.stdout and "acc" in proc.stdout
