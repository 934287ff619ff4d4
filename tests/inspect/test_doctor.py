"""doctor: every check passes on a good model and fails on a model with the matching bug."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from build_llm import CharTokenizer, GPTConfig, GPTModel, load_checkpoint, set_seed
from build_llm import attention as attention_module
from build_llm.inspect.doctor import (SAMPLE_TEXT, check_causal, check_gradients, check_initial_loss, check_kv_cache,
                                      check_overfit, check_tokenizer, check_untrained_loss, doctor_text, run_checks)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def abc(abc_checkpoint):  # a fresh copy per test: some tests break it
    ckpt = load_checkpoint(abc_checkpoint)
    return ckpt.model, ckpt.tokenizer


def _by_name(results):
    return {r.name: r for r in results}


def test_a_trained_abc_model_passes_every_check(abc):
    model, tok = abc
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = list(run_checks(model, tok))
    assert [r.name for r in results] == ["tokenizer round-trip", "initial loss", "causal mask", "KV cache",
                                         "gradients", "overfit one batch"]
    # the initial-loss check is for untrained models: a loss far below ln V shows this one is trained
    assert [r.status for r in results] == ["PASS", "SKIP", "PASS", "PASS", "PASS", "PASS"], \
        "\n".join(r.line() for r in results)
    assert "a trained model" in _by_name(results)["initial loss"].detail
    for k, v in model.state_dict().items():  # the training checks worked on a copy
        assert torch.equal(v, before[k]), k
    assert not model.training


def _break_mask_buffer(model):
    """The explicit attention path with a mask that forbids nothing: the future leaks. (No layer stores a
    mask any more; the one each call builds is replaced.)"""
    for block in model.trf_blocks:
        block.att.impl = "explicit"
        block.att.causal_mask = lambda start, n, device: torch.zeros(n, start + n, dtype=torch.bool, device=device)


def test_a_broken_causal_mask_fails(abc):
    model, tok = abc
    _break_mask_buffer(model)
    results = _by_name(run_checks(model, tok, steps=5))
    assert results["causal mask"].status == "FAIL"
    assert "the future leaks" in results["causal mask"].detail
    assert results["KV cache"].status == "FAIL"  # with the cache the future is not there to leak
    assert results["tokenizer round-trip"].status == "PASS"


def test_a_non_causal_fused_path_fails(abc, monkeypatch):
    """The default (fused SDPA) path does not read the mask buffer; break it where it is decided."""
    model, _ = abc
    sdpa = F.scaled_dot_product_attention

    def sdpa_without_causality(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        return sdpa(q, k, v, dropout_p=dropout_p)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", sdpa_without_causality)
    idx = torch.tensor([[2, 3, 4, 1, 2, 2, 3, 4]])
    assert check_causal(model, idx).status == "FAIL"
    monkeypatch.undo()
    assert check_causal(model, idx).status == "PASS"


def test_initial_loss_near_ln_v_for_an_untrained_model_and_far_with_a_bad_init():
    set_seed(0)
    model = GPTModel(GPTConfig.from_preset("r-abc")).eval()
    batch = torch.randint(0, 5, (8, 17), generator=torch.Generator().manual_seed(0))
    good = check_initial_loss(model, batch, untrained=True)
    assert good.status == "PASS", good.line()
    with torch.no_grad():
        model.out_head.weight.mul_(30)  # logits spread by ~30x: far from uniform
    bad = check_initial_loss(model, batch, untrained=True)
    assert bad.status == "FAIL" and "initialisation" in bad.detail
    assert check_initial_loss(model, batch, untrained=False).status == "FAIL"  # worse than uniform
    # Not knowing whether it is trained (no trainer state), doctor checks a loss that is not far below ln V
    # as an untrained model's: the bad initialisation is still caught; a known trained model skips it.
    unknown = check_untrained_loss(model, batch, None)
    assert unknown.status == "FAIL" and "initialisation" in unknown.detail
    assert check_untrained_loss(model, batch, False).status == "SKIP"
    with torch.no_grad():
        model.out_head.weight.div_(30)
    assert check_untrained_loss(model, batch, None).status == "PASS"


def test_a_character_model_round_trips_text_in_its_alphabet():
    """A character tokenizer cannot encode what it never saw: the default text is the built-in sample cut
    to its alphabet, then the alphabet, so every character it has is round-tripped and none it lacks."""
    tok = CharTokenizer.from_text("Ó coração não pára, João!\n")
    text, source = doctor_text(tok, None)
    assert set(text) == set(tok.vocab[1:]) and text.endswith("".join(tok.vocab[1:])) and "alphabet" in source
    assert "ção" in text  # from the sample, where the alphabet has it
    assert check_tokenizer(tok, text).status == "PASS"
    assert check_tokenizer(tok, SAMPLE_TEXT).status == "FAIL"  # the sample whole: characters it lacks


def test_gradients_and_overfit_fail_when_training_cannot_work(abc):
    model, tok = abc
    window = torch.tensor([tok.encode("AABCBBCBCABCCAAA")])  # (1, 16): 15 targets
    assert check_overfit(model, window, steps=30, lr=0.0).status == "FAIL"  # no learning rate, no learning
    with torch.no_grad():
        model.trf_blocks[0].ff.layers[0].weight[0, 0] = float("nan")
    result = check_gradients(model, window)
    assert result.status == "FAIL" and "non-finite" in result.detail


def test_kv_cache_check_catches_a_cache_that_forgets(abc, monkeypatch):
    model, _ = abc
    idx = torch.tensor([[2, 3, 4, 1, 2, 2, 3, 4, 3, 3]])
    assert check_kv_cache(model, idx).status == "PASS"
    original = attention_module.MultiHeadAttention.forward

    def forgetful(self, x, cache=None):
        if cache is not None and cache.pos > 0:
            cache.k[:, :, : cache.pos] = 0  # the cached keys are lost
        return original(self, x, cache)

    monkeypatch.setattr(attention_module.MultiHeadAttention, "forward", forgetful)
    assert check_kv_cache(model, idx).status == "FAIL"


def test_tokenizer_round_trip_fails_on_characters_outside_the_vocabulary():
    tok = CharTokenizer(["<PAD>", "A", "B"])
    assert check_tokenizer(tok, "ABBA").status == "PASS"
    result = check_tokenizer(tok, "ABC")
    assert result.status == "FAIL" and "'C'" in result.detail

    class Lossy(CharTokenizer):
        def decode(self, ids):
            return super().decode(ids).lower()

    result = check_tokenizer(Lossy(["<PAD>", "A", "b"]), "Ab")
    assert result.status == "FAIL" and "character 0" in result.detail
