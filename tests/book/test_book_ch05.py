"""Chapter 5: the book's `generate` (positional, stopping before the end token), its 9-word sampling
example's printed numbers, the book's training loop `train_model_simple`, `assign`,
`load_weights_into_gpt` against Hugging Face, and `plot_losses`."""

import numpy as np
import pytest
import torch

import build_llm
from build_llm import GPTConfig, GPTModel
from build_llm.book import ch05
from build_llm.book.ch02 import create_dataloader_v1
from build_llm.book.ch05 import assign, generate, load_weights_into_gpt, train_model_simple
from build_llm.train.loop import next_token_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"vocab_size": 61, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
        "qkv_bias": False}


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPTModel({**TINY, **overrides}).eval()


# --- generate -------------------------------------------------------------------------------------
def test_positional_greedy_generate_is_generate_text_simple():
    model, idx = tiny_model(), torch.tensor([[1, 2, 3]])
    out = generate(model, idx, 20, 16)  # the book's positional call
    torch.testing.assert_close(out, build_llm.generate_text_simple(model, idx, 20, 16))


def test_generate_stops_before_appending_the_end_token():
    model, idx = tiny_model(), torch.tensor([[5, 9]])
    full = build_llm.generate_text_simple(model, idx, 12, 16)
    new = full[0, 2:].tolist()
    first = next(k for k in range(2, len(new)) if new[k] not in new[:k])  # a token new at step k >= 2
    eos = new[first]  # becomes the end token
    out = generate(model, idx, 12, 16, 0.0, None, eos)
    torch.testing.assert_close(out, full[:, :2 + first])  # the book's loop: stop, end token not kept
    kept = build_llm.generate(model, idx, 12, eos_id=eos)  # the package's: the end token is kept
    torch.testing.assert_close(kept, full[:, :2 + first + 1])


def test_end_token_with_a_batch_is_refused_and_other_arguments_are_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="batch of 1 sequence, got 2"):
        generate(model, torch.zeros(2, 3, dtype=torch.long), 5, 16, eos_id=0)
    with pytest.raises(ValueError, match="top_k=0"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 5, 16, 1.0, 0)
    with pytest.raises(ValueError, match="context_size=17"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 5, 17)


# The book's section 5.3 example: a 9-word vocabulary and the next-token logits after "every effort
# moves you" (LLMs-from-scratch, ch05/01_main-chapter-code/ch05.ipynb).
VOCAB = ["closer", "every", "effort", "forward", "inches", "moves", "pizza", "toward", "you"]
NEXT_TOKEN_LOGITS = torch.tensor([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])


def constant_logits_model() -> GPTModel:
    """A real GPTModel whose logits are NEXT_TOKEN_LOGITS at every position: the final LayerNorm
    outputs its shift (scale 0), a one-hot vector, and the head maps it to the logits."""
    model = tiny_model(vocab_size=9, emb_dim=9, n_heads=3, n_layers=1, context_length=8)
    with torch.no_grad():
        model.final_norm.scale.zero_()
        model.final_norm.shift.copy_(torch.eye(9)[0])
        model.out_head.weight.zero_()
        model.out_head.weight[:, 0] = NEXT_TOKEN_LOGITS
    return model


def sampled(temperature, top_k=None, n=1000):
    model = constant_logits_model()
    torch.manual_seed(123)
    out = generate(model, torch.tensor([[8]]), n, 8, temperature, top_k)
    return out[0, 1:]


def test_greedy_picks_forward():
    assert VOCAB[int(generate(constant_logits_model(), torch.tensor([[8]]), 1, 8)[0, 1])] == "forward"


def test_sampling_1000_tokens_gives_the_books_printed_counts():
    counts = torch.bincount(sampled(1.0), minlength=9).tolist()
    # Printed by the book's print_sampled_tokens(probas) after torch.manual_seed(123):
    book = {"closer": 73, "every": 0, "effort": 0, "forward": 582, "inches": 2, "moves": 0, "pizza": 0, "toward": 343}
    assert dict(zip(VOCAB, counts)) == {**book, "you": 0}


@pytest.mark.parametrize("temperature", [0.1, 5.0])
def test_temperature_scaling_samples_as_torch_does(temperature):
    # Independent reference: torch's own sampler on the book's softmax_with_temperature.
    torch.manual_seed(123)
    probas = torch.softmax(NEXT_TOKEN_LOGITS / temperature, dim=0)
    expected = [torch.multinomial(probas, num_samples=1).item() for _ in range(300)]
    assert sampled(temperature, n=300).tolist() == expected


def test_top_k_keeps_the_three_largest_logits():
    top_logits, top_pos = torch.topk(NEXT_TOKEN_LOGITS, 3)
    assert top_pos.tolist() == [3, 7, 0]  # the book prints tensor([3, 7, 0])
    masked = torch.full_like(NEXT_TOKEN_LOGITS, -torch.inf).scatter(0, top_pos, top_logits)
    probas = torch.softmax(masked, dim=0)
    # The book prints tensor([0.0615, 0.0000, 0.0000, 0.5775, 0.0000, 0.0000, 0.0000, 0.3610, 0.0000])
    torch.testing.assert_close(probas, torch.tensor([0.0615, 0, 0, 0.5775, 0, 0, 0, 0.3610, 0]), atol=5.1e-5, rtol=0)
    torch.manual_seed(123)
    expected = [torch.multinomial(probas, num_samples=1).item() for _ in range(300)]
    assert sampled(1.0, top_k=3, n=300).tolist() == expected


# --- section 5.1 with the book's untrained model ---------------------------------------------------
def test_the_untrained_models_text_probabilities_and_loss_are_the_books():
    """Section 5.1, printed in the book's chapter 5 notebook (LLMs-from-scratch,
    ch05/01_main-chapter-code/ch05.ipynb): GPT_CONFIG_124M with context_length 256 and
    torch.manual_seed(123), before any training."""
    import tiktoken

    from build_llm.book.ch04 import GPT_CONFIG_124M

    torch.manual_seed(123)
    model = GPTModel({**GPT_CONFIG_124M, "context_length": 256}).eval()
    tokenizer = tiktoken.get_encoding("gpt2")
    token_ids = generate(model, ch05.text_to_token_ids("Every effort moves you", tokenizer), 10, 256)
    assert ch05.token_ids_to_text(token_ids, tokenizer) == "Every effort moves you rentingetic wasnم refres RexMeCHicular stren"

    inputs = torch.tensor([[16833, 3626, 6100], [40, 1107, 588]])  # "every effort moves", "I really like"
    targets = torch.tensor([[3626, 6100, 345], [1107, 588, 11311]])  # "effort moves you", "really like chocolate"
    with torch.no_grad():
        probas = torch.softmax(model(inputs), dim=-1)
    target_probas = torch.stack([probas[i, [0, 1, 2], targets[i]] for i in range(2)])
    torch.testing.assert_close(target_probas, torch.tensor([[7.4541e-05, 3.1061e-05, 1.1563e-05],
                                                            [1.0337e-05, 5.6776e-05, 4.7559e-06]]), rtol=2e-4, atol=0)
    with torch.no_grad():
        loss = ch05.calc_loss_batch(inputs, targets, model, "cpu")
    assert loss.item() == pytest.approx(10.7940, abs=6e-5)  # printed tensor(10.7940)
    assert torch.exp(loss).item() == pytest.approx(48725.8203, rel=1e-4)  # the printed perplexity


# --- the training functions: the book's loop in the chapter, on the package's loss ----------------
PARAGRAPH = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.\n"
)


def test_training_names_live_in_the_chapter_on_the_packages_loss():
    for name in ("calc_loss_batch", "calc_loss_loader", "evaluate_model", "generate_and_print_sample",
                 "train_model_simple"):
        assert getattr(ch05, name).__module__ == "build_llm.book.ch05", name
    model = tiny_model()
    x, y = torch.randint(0, TINY["vocab_size"], (2, 2, 8))
    with torch.no_grad():
        assert torch.equal(ch05.calc_loss_batch(x, y, model, "cpu"), next_token_loss(model, x, y, "cpu"))
    assert ch05.text_to_token_ids is build_llm.text_to_token_ids


def test_train_model_simple_is_the_books(capsys):
    torch.manual_seed(123)
    text = PARAGRAPH * 4
    split = int(0.9 * len(text))
    train_loader = create_dataloader_v1(text[:split], batch_size=2, max_length=16, stride=16, shuffle=True)
    val_loader = create_dataloader_v1(text[split:], batch_size=2, max_length=16, stride=16, shuffle=False)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
    import tiktoken

    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, "cpu", num_epochs=3, eval_freq=5, eval_iter=2,
        start_context="It is a truth", tokenizer=tiktoken.get_encoding("gpt2"))
    steps = 3 * len(train_loader)
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == len(range(0, steps, 5))
    assert tokens_seen == [(s + 1) * 2 * 16 for s in range(0, steps, 5)]
    assert train_losses[-1] < train_losses[0] - 1.0
    out = capsys.readouterr().out
    assert out.count("It is a truth") == 3 and "Ep 1 (Step 000000): Train loss" in out


def test_model_configs_are_the_gpt2_sizes():
    assert ch05.model_configs["gpt2-small (124M)"] == {"emb_dim": 768, "n_layers": 12, "n_heads": 12}
    assert ch05.model_configs["gpt2-xl (1558M)"] == {"emb_dim": 1600, "n_layers": 48, "n_heads": 25}


# --- assign and load_weights_into_gpt -------------------------------------------------------------
def test_assign_checks_the_shape_and_copies():
    left = torch.nn.Parameter(torch.zeros(2, 3))
    right = np.arange(6, dtype=np.float64).reshape(2, 3)
    param = assign(left, right)
    assert isinstance(param, torch.nn.Parameter) and param.dtype == torch.float32
    torch.testing.assert_close(param.data, torch.arange(6.0).reshape(2, 3))
    with pytest.raises(ValueError, match=r"Shape mismatch. Left: \(2, 3\), Right: \(3, 2\)"):
        assign(left, right.T)


HF_SHAPE = dict(vocab_size=101, n_positions=16, n_embd=32, n_layer=2, n_head=4)


def tiny_hf():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(**HF_SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                   eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases (they start at 1 and 0)
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def openai_params(hf) -> dict:
    """The book's `params` (OpenAI's checkpoint layout, NumPy arrays) from a Hugging Face GPT-2: both
    store dense layers as (in, out) matrices, so only the names change."""
    sd = {k: v.detach().numpy().copy() for k, v in hf.transformer.state_dict().items()}

    def dense(prefix):
        return {"w": sd[prefix + ".weight"], "b": sd[prefix + ".bias"]}

    def norm(prefix):
        return {"g": sd[prefix + ".weight"], "b": sd[prefix + ".bias"]}

    blocks = [{"attn": {"c_attn": dense(f"h.{i}.attn.c_attn"), "c_proj": dense(f"h.{i}.attn.c_proj")},
               "mlp": {"c_fc": dense(f"h.{i}.mlp.c_fc"), "c_proj": dense(f"h.{i}.mlp.c_proj")},
               "ln_1": norm(f"h.{i}.ln_1"), "ln_2": norm(f"h.{i}.ln_2")} for i in range(HF_SHAPE["n_layer"])]
    return {"wte": sd["wte.weight"], "wpe": sd["wpe.weight"], "g": sd["ln_f.weight"], "b": sd["ln_f.bias"],
            "blocks": blocks}


BOOK_GPT2 = {"vocab_size": 101, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
             "drop_rate": 0.0, "qkv_bias": True}  # the book's NEW_CONFIG shape: qkv_bias on, untied head


@pytest.mark.parametrize("config", [BOOK_GPT2, GPTConfig.from_preset("gpt2-small", **{
    k: v for k, v in BOOK_GPT2.items() if k != "qkv_bias"})], ids=["book-config", "fused-tied-preset"])
def test_load_weights_into_gpt_matches_from_hf_and_transformers(config):
    from build_llm.interop.hf import from_hf

    hf = tiny_hf()
    torch.manual_seed(0)
    gpt = GPTModel(config).eval()
    load_weights_into_gpt(gpt, openai_params(hf))
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = gpt(idx)
        torch.testing.assert_close(logits, from_hf(hf)(idx), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_load_weights_into_gpt_says_what_does_not_fit():
    params = openai_params(tiny_hf())
    with pytest.raises(ValueError, match=r"no trf_blocks\.0\.att\.W_query\.bias.*qkv_bias=True"):
        load_weights_into_gpt(GPTModel({**BOOK_GPT2, "qkv_bias": False}), params)
    with pytest.raises(ValueError, match=r"pos_emb\.weight: Shape mismatch. Left: \(16, 64\), Right: \(16, 32\)"):
        load_weights_into_gpt(GPTModel({**BOOK_GPT2, "emb_dim": 64}), params)
    with pytest.raises(ValueError, match="params has 2 blocks but the model has 3 layers"):
        load_weights_into_gpt(GPTModel({**BOOK_GPT2, "n_layers": 3}), params)


# --- plot_losses ----------------------------------------------------------------------------------
def test_plot_losses_draws_the_books_figure(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    epochs, tokens = torch.linspace(0, 2, 5), [0, 512, 1024, 1536, 2048]
    fig = ch05.plot_losses(epochs, tokens, [9.0, 7.0, 6.0, 5.5, 5.0], [9.1, 7.5, 6.8, 6.6, 6.5],
                           path=tmp_path / "loss-plot.pdf")
    ax1, ax2 = fig.axes
    assert ax1.get_xlabel() == "Epochs" and ax1.get_ylabel() == "Loss" and ax2.get_xlabel() == "Tokens seen"
    assert [line.get_label() for line in ax1.get_lines()] == ["Training loss", "Validation loss"]
    assert list(ax1.get_lines()[1].get_ydata()) == [9.1, 7.5, 6.8, 6.6, 6.5]
    assert ax2.get_xlim()[1] >= 2048
    assert (tmp_path / "loss-plot.pdf").stat().st_size > 0
    monkeypatch.chdir(tmp_path)
    ch05.plot_losses(epochs, tokens, [1.0] * 5, [1.0] * 5)  # no path: nothing written (the book wrote loss-plot.pdf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss-plot.pdf"]


def test_plot_losses_replaces_a_symbolic_link_at_its_path_and_leaves_the_target_alone(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    victim = tmp_path / "thesis.pdf"
    victim.write_bytes(b"%PDF- a user's file")
    (tmp_path / "loss-plot.pdf").symlink_to(victim)
    ch05.plot_losses([0, 1], [0, 512], [2.0, 1.0], [2.1, 1.5], path=tmp_path / "loss-plot.pdf")
    assert victim.read_bytes() == b"%PDF- a user's file"
    written = tmp_path / "loss-plot.pdf"
    assert not written.is_symlink() and written.read_bytes().startswith(b"%PDF")
