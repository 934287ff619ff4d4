"""`build-llm generate` streams: each token's text is written (and flushed) as soon as it is
generated, and stdout is exactly the prompt and its continuation, then a newline. It samples by
default (temperature 0.8, top-k 200, as nanoGPT's sample.py), seeded; --greedy or --temperature 0
decodes greedily; --num-samples N draws N texts; without --prompt a new text starts."""

import re
import subprocess
import sys

import pytest
import torch

from build_llm import CharTokenizer, GPTModel, generate, get_tokenizer, load_model, save_checkpoint, text_to_token_ids
from build_llm.cli import main
from tiny import TINY, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    torch.manual_seed(0)
    model = GPTModel(TINY)
    save_checkpoint(path, model, get_tokenizer("gpt2"))
    return path


class Recorder:
    """A stdout that notes, at each write and flush, how many model forwards had run."""

    def __init__(self, forwards):
        self.forwards, self.events, self.text = forwards, [], ""

    def write(self, s):
        self.events.append(("write", self.forwards[0]))
        self.text += s
        return len(s)

    def flush(self):
        self.events.append(("flush", self.forwards[0]))


def test_tokens_are_printed_as_they_are_generated(checkpoint, monkeypatch):
    forwards = [0]

    def count(module, args, output):
        if isinstance(module, GPTModel):
            forwards[0] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    out = Recorder(forwards)
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "Once upon a time",
                     "--max-new-tokens", "40", "--temperature", "1.0", "--seed", "5"]) == 0
    finally:
        handle.remove()
    writes = [n for kind, n in out.events if kind == "write"]
    assert writes[0] == 0 and out.text.startswith("Once upon a time")  # the prompt before any forward
    assert len(set(writes)) > 20  # text written after most of the 40 steps, not once at the end
    # every write is flushed at once
    assert all(out.events[i + 1][0] == "flush" for i, (kind, _) in enumerate(out.events[:-1]) if kind == "write")

    # Exactly the prompt and the continuation that generate() gives for the same seed, then a newline.
    model, tok = load_model(checkpoint), get_tokenizer("gpt2")
    idx = text_to_token_ids("Once upon a time", tok)
    expected = generate(model, idx, 40, temperature=1.0, top_k=200, eos_id=tok.eos_id,
                        generator=torch.Generator().manual_seed(5))
    assert out.text == tok.decode(expected[0].tolist()) + "\n"


def test_streamed_output_through_a_pipe_is_the_same_text(checkpoint):
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "The", "--max-new-tokens", "8", "--greedy"]
    result = subprocess.run([sys.executable, "-m", "build_llm.cli", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    model, tok = load_model(checkpoint), get_tokenizer("gpt2")
    expected = generate(model, text_to_token_ids("The", tok), 8, eos_id=tok.eos_id)
    assert result.stdout == tok.decode(expected[0].tolist()) + "\n" and result.stderr == ""


def cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_default_is_sampling_at_nanogpt_settings_and_greedy_is_a_flag(checkpoint, capsys):
    model, tok = load_model(checkpoint), get_tokenizer("gpt2")
    idx = text_to_token_ids("Once upon a time", tok)
    sampled = cli(capsys, "--checkpoint", checkpoint, "--prompt", "Once upon a time", "--max-new-tokens", 30)
    expected = generate(model, idx, 30, temperature=0.8, top_k=200, eos_id=tok.eos_id,
                        generator=torch.Generator().manual_seed(0))  # the default --seed is 0
    assert sampled == tok.decode(expected[0].tolist()) + "\n"
    greedy = tok.decode(generate(model, idx, 30, eos_id=tok.eos_id)[0].tolist()) + "\n"
    assert sampled != greedy
    for flag in (["--greedy"], ["--temperature", "0"]):
        assert cli(capsys, "--checkpoint", checkpoint, "--prompt", "Once upon a time", "--max-new-tokens", 30,
                   *flag) == greedy
    assert main(["generate", "--checkpoint", str(checkpoint), "--greedy", "--temperature", "1"]) == 2
    err = capsys.readouterr().err
    assert "not allowed with" in err and err.count("\n") == 1


def test_the_default_draws_from_the_distribution_at_temperature_0_8(tmp_path, capsys):
    """3,000 one-token samples of a 5-character model: their frequencies are softmax(logits / 0.8)."""
    tok = CharTokenizer(["<PAD>", "\n", "a", "b", "c", "d"])
    torch.manual_seed(3)
    model = GPTModel(tiny_cfg(tok.vocab_size)).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(4)  # spread the logits, so that temperatures 0.8 and 1 differ clearly
        logits = model(torch.tensor([tok.encode("ab")]))[0, -1].double()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    n = 3000
    out = cli(capsys, "--checkpoint", tmp_path / "ckpt", "--prompt", "ab", "--max-new-tokens", 1, "--num-samples", n)
    texts = [part[:-1] for part in re.split(r"--- sample \d+ of \d+ ---\n", out)[1:]]  # each ends with "\n"
    assert len(texts) == n and all(t.startswith("ab") and len(t) <= 3 for t in texts)
    freq = torch.tensor([sum(t[2:] == c for t in texts) for c in ["", *"\nabcd"]], dtype=torch.double) / n  # "": <PAD>
    p_08, p_1 = torch.softmax(logits / 0.8, -1), torch.softmax(logits, -1)
    bound = 4 * torch.sqrt(p_08 * (1 - p_08) / n) + 1e-3
    assert torch.all((freq - p_08).abs() <= bound), (freq, p_08)
    assert (p_08 - p_1).abs().max() > 0.05 and torch.any((freq - p_1).abs() > 4 * torch.sqrt(p_1 * (1 - p_1) / n))


def test_num_samples_are_separated_reproducible_and_differ(checkpoint, capsys):
    args = ["--checkpoint", checkpoint, "--prompt", "The", "--max-new-tokens", 12, "--seed", 7]
    three = cli(capsys, *args, "--num-samples", 3)
    assert cli(capsys, *args, "--num-samples", 3) == three  # the seed fixes all of them
    assert cli(capsys, *args[:-1], 8, "--num-samples", 3) != three
    parts = three.split("--- sample ")
    assert parts[0] == "" and [p.split(" ---\n")[0] for p in parts[1:]] == ["1 of 3", "2 of 3", "3 of 3"]
    samples = [p.split(" ---\n", 1)[1] for p in parts[1:]]
    assert all(s.startswith("The") and s.endswith("\n") for s in samples) and len(set(samples)) == 3
    assert cli(capsys, *args) == samples[0]  # one sample alone: no header, the first of the three


def test_without_a_prompt_a_new_text_starts_after_the_end_token(checkpoint, tmp_path, capsys):
    model, tok = load_model(checkpoint), get_tokenizer("gpt2")
    out = cli(capsys, "--checkpoint", checkpoint, "--max-new-tokens", 10, "--greedy")
    after_eos = generate(model, torch.tensor([[tok.eos_id]]), 10, eos_id=tok.eos_id)[0, 1:]
    assert out == tok.decode(after_eos.tolist()) + "\n"  # the start token itself is not printed
    # A character tokenizer has no end token: a newline starts the text, or id 0 without one.
    for chars, start in (("\nab", "\n"), ("ab", None)):
        char_tok = CharTokenizer(["<PAD>", *chars])
        torch.manual_seed(1)
        char_model = GPTModel(tiny_cfg(char_tok.vocab_size)).eval()
        save_checkpoint(tmp_path / "c", char_model, char_tok)
        first = char_tok.encode(start) if start else [0]
        expected = generate(char_model, torch.tensor([first]), 12, temperature=0.8, top_k=200,
                            generator=torch.Generator().manual_seed(0))[0, 1:]
        assert cli(capsys, "--checkpoint", tmp_path / "c", "--max-new-tokens", 12) == char_tok.decode(
            expected.tolist()) + "\n"
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", ""]) == 2
    assert "leave --prompt out" in capsys.readouterr().err
