"""The inspect, surprisal and doctor verbs end to end: files written, their content right, bad input."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from build_llm import CharTokenizer, GPTConfig, GPTModel, get_tokenizer, load_checkpoint, save_checkpoint, set_seed
from build_llm import attention as attention_module
from build_llm.cli import main
from build_llm.data.markov import ABC, abc_text, optimal_window_losses
from tiny import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    """A tiny random model with the GPT-2 vocabulary and tokenizer (fast stand-in for book-124m)."""
    set_seed(5)
    model = GPTModel(TINY)
    return save_checkpoint(tmp_path_factory.mktemp("gpt2") / "ckpt", model, get_tokenizer("gpt2"))


def _bad(capsys, argv, *needles):
    """Bad input: exit 2, one line on stderr naming the problem, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_inspect_abc_checkpoint_writes_correct_numbers_and_pictures(abc_checkpoint, tmp_path, capsys, monkeypatch):
    prompt = "CAAACB\n\nAABCBBC"
    monkeypatch.setenv("COLUMNS", "80")  # a common terminal's size, which this mask fits
    monkeypatch.setenv("LINES", "24")
    assert main(["inspect", "--checkpoint", str(abc_checkpoint), "--prompt", prompt, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("attention.png", "mask.txt", "next_token.png", "next_token.txt", "layers.png", "inspect.json"):
        assert (tmp_path / name).stat().st_size > 0
        assert f"wrote {tmp_path / name}" in out
    data = json.loads((tmp_path / "inspect.json").read_text(encoding="utf-8"))
    T = len(prompt)
    assert data["tokens"] == list(prompt) and data["labels"][6] == "\\n"
    assert data["positions"] == list(range(T))
    assert data["mask"] == np.triu(np.ones((T, T), dtype=int), k=1).tolist()
    att = np.array(data["attention"])  # (layers, heads, T, T)
    assert att.shape == (2, 2, T, T)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(att, k=1) == 0)
    # The table's probabilities are the softmax of the model's last logits; the true ones are the source's.
    ckpt = load_checkpoint(abc_checkpoint)
    with torch.no_grad():
        probs = torch.softmax(ckpt.model(torch.tensor([ckpt.tokenizer.encode(prompt)]))[0, -1], -1)
    for row in data["next_token"]:
        assert row["probability"] == pytest.approx(probs[row["id"]].item(), abs=1e-6)
    truth = {r["token"]: r["true_probability"] for r in data["next_token"]}
    assert truth.get("A", 0.4) == pytest.approx(0.4) and truth.get("C", 0.2) == pytest.approx(0.2)
    assert len(data["residual_norms"]) == 3 and len(data["attention_entropy_bits"]) == 2
    # The printed mask is the seed's 0/1 matrix, one row per query.
    assert " A   0  0  0  0  0  0  0  0  0  1  1  1  1  1  1" in out
    assert (tmp_path / "mask.txt").read_text(encoding="utf-8") in out + "\n"


def _printed_mask(out: str) -> list[str]:
    """The printed mask: from its column header to the blank line after it."""
    block = out.split("1 = may not look at that position\n", 1)[1].split("\n\n", 1)[0]
    return block.splitlines()


def test_inspect_prints_no_mask_larger_than_the_terminal(tmp_path, capsys, monkeypatch):
    set_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", GPTModel(GPTConfig.from_preset("r-abc", context_length=64)),
                           CharTokenizer(["<PAD>", *ABC.alphabet]))
    prompt = abc_text(40, seed=1)[:41]  # 41 tokens: a 41 x 41 mask, 3 characters a column
    assert len(prompt) == 41
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")
    assert main(["inspect", "--checkpoint", str(ckpt), "--prompt", prompt, "--out", str(tmp_path / "o")]) == 0
    shown = _printed_mask(capsys.readouterr().out)
    assert shown[0] == "(the top-left 20 x 20 of the 41 x 41 mask; all of it is in mask.txt)"
    rows = shown[2:]
    assert len(shown) <= 24 and all(len(line) <= 80 for line in shown)
    assert len(rows) == 20 and [line.split()[1:] for line in rows] == [
        ["0"] * (t + 1) + ["1"] * (19 - t) for t in range(20)]  # the corner of the causal mask
    whole = (tmp_path / "o" / "mask.txt").read_text(encoding="utf-8").splitlines()
    assert len(whole[-41:]) == 41 and all(len(line.split()) == 42 for line in whole[-41:])  # label + 41
    monkeypatch.setenv("COLUMNS", "200")  # a wide, tall terminal shows it whole
    monkeypatch.setenv("LINES", "60")
    assert main(["inspect", "--checkpoint", str(ckpt), "--prompt", prompt, "--out", str(tmp_path / "o")]) == 0
    shown = _printed_mask(capsys.readouterr().out)
    assert "top-left" not in shown[0] and shown[1:] == whole[-41:]


def test_inspect_gpt2_vocabulary_shows_spaces(gpt2_checkpoint, tmp_path, capsys):
    assert main(["inspect", "--checkpoint", str(gpt2_checkpoint), "--prompt", "O gato sobe no\ntelhado",
                 "--out", str(tmp_path), "--top-k", "5", "--temperatures", "0.7,1.5"]) == 0
    data = json.loads((tmp_path / "inspect.json").read_text(encoding="utf-8"))
    assert "␣no" in data["labels"] and "\\n" in "".join(data["labels"])
    assert len(data["next_token"]) == 5 and [t["temperature"] for t in data["temperatures"]] == [0.7, 1.5]
    assert all(len(t["kept_ids"]) <= 5 for t in data["temperatures"])
    capsys.readouterr()


def test_surprisal_html_and_totals_against_a_direct_computation(abc_checkpoint, tmp_path, capsys):
    text = abc_text(5, seed=2)[:17]  # context 16 + 1: one window, each token's context is the text before it
    page = tmp_path / "s.html"
    assert main(["surprisal", "--checkpoint", str(abc_checkpoint), "--text", text, "--out", str(page)]) == 0
    out = capsys.readouterr().out
    ckpt = load_checkpoint(abc_checkpoint)
    ids = ckpt.tokenizer.encode(text)
    nats, optimum = [], []
    with torch.no_grad():
        for j in range(1, len(ids)):
            logits = ckpt.model(torch.tensor([ids[:j]]))[0, -1]
            nats.append(-torch.log_softmax(logits, -1)[ids[j]].item())
            optimum.append(optimal_window_losses(ABC, text[:j + 1])[-1])
    bits = np.mean(nats) / math.log(2)
    assert f"bits per token: {bits:.4f}" in out
    assert f"perplexity: {math.exp(np.mean(nats)):.4f}" in out
    assert f"exact optimum (ABC source): {np.mean(optimum) / math.log(2):.4f}" in out
    html = page.read_text(encoding="utf-8")
    values = [float(v) for v in re.findall(r'id="surprisal">(.*?)</div>', html, re.S)[0].split('data-bits="')[1:]
              for v in [v.split('"')[0]]]
    np.testing.assert_allclose(values, np.array(nats) / math.log(2), atol=1e-5)
    assert 'id="excess"' in html and "By context length" in html


def test_surprisal_samples_abc_text_and_slides_windows(abc_checkpoint, tmp_path, capsys):
    page = tmp_path / "abc.html"
    assert main(["surprisal", "--checkpoint", str(abc_checkpoint), "--out", str(page), "--max-tokens", "100"]) == 0
    out = capsys.readouterr()
    assert "tokens scored: 99" in out.out and out.err == ""
    assert html_tokens(page.read_text(encoding="utf-8")) == 100


def html_tokens(html: str) -> int:
    block = re.findall(r'id="surprisal">(.*?)</div>', html, re.S)[0]
    return block.count('<span class="tok')


def test_doctor_exit_codes(abc_checkpoint, capsys, monkeypatch):
    assert main(["doctor", "--checkpoint", str(abc_checkpoint), "--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS  ") == 5 and "5 passed, 1 skipped, 0 failed" in out
    assert "SKIP  initial loss" in out and "a trained model" in out
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw: sdpa(q, k, v, **kw))
    assert main(["doctor", "--checkpoint", str(abc_checkpoint), "--steps", "5"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  causal mask: the future leaks" in out and "failed: causal mask" in out


def test_doctor_on_an_untrained_preset_checks_the_loss_against_ln_v(capsys):
    assert main(["doctor", "--preset", "r-abc", "--steps", "40"]) == 0
    out = capsys.readouterr().out
    assert "ln(vocab) = 1.6094" in out and "near uniform" in out


def test_bad_input_is_one_line_and_exit_2(abc_checkpoint, gpt2_checkpoint, tmp_path, capsys):
    ck = str(abc_checkpoint)
    _bad(capsys, ["inspect", "--checkpoint", str(tmp_path / "nope"), "--prompt", "A", "--out", str(tmp_path)],
         "does not exist")
    _bad(capsys, ["inspect", "--checkpoint", ck, "--prompt", "xyz", "--out", str(tmp_path / "o")], "'x'", "valid")
    _bad(capsys, ["inspect", "--checkpoint", ck, "--prompt", "A", "--out", str(tmp_path / "o"), "--top-p", "1.5"],
         "--top-p")
    _bad(capsys, ["inspect", "--checkpoint", ck, "--prompt", "A", "--out", str(tmp_path), "--temperatures", "1,x"],
         "temperatures")
    a_file = tmp_path / "keep.txt"
    a_file.write_text("precious")
    _bad(capsys, ["inspect", "--checkpoint", ck, "--prompt", "A", "--out", str(a_file)], "is a file")
    assert a_file.read_text() == "precious"
    _bad(capsys, ["surprisal", "--checkpoint", ck, "--text", "AB", "--out", str(tmp_path)], "is a directory")
    _bad(capsys, ["surprisal", "--checkpoint", str(gpt2_checkpoint), "--abc", "--text", "hi", "--out",
                  str(tmp_path / "x.html")], "--abc")
    _bad(capsys, ["surprisal", "--checkpoint", str(gpt2_checkpoint), "--out", str(tmp_path / "x.html")], "--text")
    _bad(capsys, ["surprisal", "--checkpoint", ck, "--abc", "--text", "AAAAAAAA", "--out", str(tmp_path / "x.html")],
         "cannot occur")
    _bad(capsys, ["doctor", "--checkpoint", ck, "--data", str(tmp_path / "missing.txt")], "data path", "missing.txt", "does not exist")
    assert not (tmp_path / "x.html").exists()


@pytest.mark.slow
def test_book_124m_inspect_doctor_surprisal(tmp_path, capsys):
    """The seed's 163M-parameter model, random: every verb runs on it (slow on a CPU)."""
    assert main(["inspect", "--preset", "book-124m", "--prompt", "O gato sobe no", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "inspect.json").read_text(encoding="utf-8"))
    att = np.array(data["attention"])
    assert att.shape == (12, 12, 6, 6)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(att, k=1) == 0)
    assert main(["doctor", "--preset", "book-124m", "--steps", "20"]) == 0
    assert main(["surprisal", "--preset", "book-124m", "--text", "O gato sobe no telhado.", "--out",
                 str(tmp_path / "s.html")]) == 0
    out = capsys.readouterr().out
    assert "6 passed, 0 failed" in out and "perplexity" in out


PORTUGUESE = ["coração", "não", "é", "está", "você", "maçã", "pão", "João", "Ângela", "órgão", "açúcar", "avó",
              "lá", "até", "três", "o", "gato", "sobe", "no", "telhado", "e", "a", "chuva", "cai", "devagar"]


@pytest.mark.parametrize("what", ["make demo", pytest.param("make demo, 10 s budget", marks=pytest.mark.slow),
                                  "portuguese characters"])
def test_doctor_passes_on_a_healthy_trained_run(what, tmp_path, capsys):
    """No false alarm: `make demo`'s ABC run and a character model of accented text, each trained
    briefly through the CLI, pass (the initial-loss check skipped: their trainer state records steps)."""
    run = tmp_path / "run"
    if what.startswith("make demo"):  # make demo's command, shortened
        argv = ["train", "--out", str(run), *(["--time-budget", "10s"] if "budget" in what else ["--steps", "10"])]
    else:
        rng = np.random.default_rng(0)
        words = rng.choice(PORTUGUESE, size=4000)
        text = "".join(w + (".\n" if i % 9 == 8 else " ") for i, w in enumerate(words))
        (tmp_path / "pt.txt").write_text(text, encoding="utf-8")
        argv = ["train", "--data", str(tmp_path / "pt.txt"), "--tokenizer", "char", "--out", str(run),
                "--time-budget", "8s"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["doctor", "--checkpoint", str(run), "--steps", "40"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "5 passed, 1 skipped, 0 failed" in out and "SKIP  initial loss: a trained model (its trainer state" in out
    assert "PASS  tokenizer round-trip" in out
