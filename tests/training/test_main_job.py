"""The learning guard: the README's main job (``deepseek-jax train`` with its defaults) cut to 800 steps must still
learn arithmetic. Measured on the 2-core CPU (2026-12-05, ``deepseek-jax train --steps 800 --seed S``): 49.0%,
39.8% and 40.2% of the 1,778 held-out answers exactly right for seeds 0, 1 and 2 (400 steps: 19.3%, 15.3%,
14.6%; the full 3000 steps: 96.9%, 96.9%, 97.1%). The bound, 25%, is well under the lowest of those and above
what half the training reaches, so a change that slows learning or breaks the model fails it."""

import json

import pytest

from deepseek_jax.cli import main
from deepseek_jax.cli.train import register
from deepseek_jax.data.tasks.arithmetic import EOS_ID, encode_prompt
from deepseek_jax.data.tokenizer import load_tokenizer
from deepseek_jax.training.run import save_tokenizer

GUARD_STEPS = 800
GUARD_BOUND = 0.25


def test_the_defaults_are_the_recipe_the_readme_quotes():
    import argparse

    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    register(sub)
    args = sub.choices["train"].parse_args([])
    assert (args.preset, args.steps, args.lr, args.warmup, args.batch_size, args.seq_len, args.seed) == (
        None, 3000, 3e-3, 20, 16, 128, 0)


def test_an_arithmetic_workdir_encodes_prompts_as_its_documents_begin(tmp_path):
    # The README's `generate --raw --prompt "33+58="` on the main job's directory: the prompt must start with the
    # BOS every training document starts with (it did not: 33+58= was answered 98, 7*8= 42).
    save_tokenizer(str(tmp_path), arithmetic=True)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("7*8=") == list(encode_prompt("7*8=")) == [1, 10, 15, 11, 16]
    assert tok.eos_id == EOS_ID
    (tmp_path / "grpo").mkdir()
    save_tokenizer(str(tmp_path / "grpo"), copy_from=str(tmp_path))  # a GRPO or distill run from that checkpoint
    assert load_tokenizer(tmp_path / "grpo").encode("33+58=") == list(encode_prompt("33+58="))


@pytest.mark.slow
def test_default_recipe_learns_arithmetic(tmp_path, capsys):
    work = str(tmp_path / "run")
    assert main(["train", "--workdir", work, "--steps", str(GUARD_STEPS)]) == 0
    report = json.load(open(tmp_path / "run" / "heldout.json"))
    out = capsys.readouterr().out
    assert f"held-out arithmetic: {report['exact']:.1%} of {report['answers']}" in out
    assert report["answers"] == 1778
    assert report["exact"] >= GUARD_BOUND, f"the main job's recipe regressed: {report['exact']:.1%} after " \
                                          f"{GUARD_STEPS} steps (measured 39.8-49.0% on seeds 0-2)"
    # The README's way of asking (generate --raw, cached decoding) answers as the evaluation's full forward does.
    for question, answer, _ in report["samples"][:3]:
        assert main(["generate", "--checkpoint", work, "--raw", "--prompt", question, "--max-new-tokens", "5"]) == 0
        assert capsys.readouterr().out.splitlines()[0] == answer, question
