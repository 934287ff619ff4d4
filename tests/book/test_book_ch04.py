"""Chapter 4: the book's names are the package's model, a state dict moves strictly between the
book's GPTModel and ours both ways, and the shortcut-connection example prints the book's numbers.

The reference for the state-dict tests is an independent re-implementation of the book's chapter-4
classes (below, written from the book's description): a float `mask` buffer saved with the weights
in every attention layer, and the book's module names.
"""

import math

import pytest
import torch
import torch.nn as nn

import build_llm
from build_llm.book import ch04
from build_llm.store.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {"vocab_size": 97, "context_length": 12, "emb_dim": 16, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1,
       "qkv_bias": False}


# --- the book's chapter-4 model, re-implemented as the reference ----------------------------------
class BookMultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, t, _ = x.shape

        def heads(z):
            return z.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        weights = self.dropout(torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).contiguous().view(b, t, self.d_out))


class BookLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class BookFeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), BookGELU(),
                                    nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]))

    def forward(self, x):
        return self.layers(x)


class BookTransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = BookMultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                          cfg["n_heads"], cfg["qkv_bias"])
        self.ff = BookFeedForward(cfg)
        self.norm1 = BookLayerNorm(cfg["emb_dim"])
        self.norm2 = BookLayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[BookTransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = BookLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


def seeded(cls, seed=123):
    torch.manual_seed(seed)
    return cls(CFG).eval()


IDX = torch.randint(0, CFG["vocab_size"], (2, CFG["context_length"]), generator=torch.Generator().manual_seed(0))


# --- tests ----------------------------------------------------------------------------------------
def test_chapter_4_names_are_the_packages_own():
    assert ch04.GPTModel is build_llm.GPTModel and ch04.TransformerBlock is build_llm.TransformerBlock
    assert ch04.LayerNorm is build_llm.LayerNorm and ch04.GELU is build_llm.GELU
    assert ch04.FeedForward is build_llm.FeedForward and ch04.MultiHeadAttention is build_llm.MultiHeadAttention
    assert ch04.generate_text_simple is build_llm.generate_text_simple
    with torch.device("meta"):  # shapes only
        model = ch04.GPTModel(ch04.GPT_CONFIG_124M)
    # The book's printed numbers (section 4.6): the total, the count once the head is tied to the
    # token embedding, and the size at 4 bytes a parameter.
    total = sum(p.numel() for p in model.parameters())
    assert total == 163_009_536
    assert total - model.out_head.weight.numel() == 124_412_160
    assert round(total * 4 / (1024 * 1024), 2) == 621.83
    assert model.tok_emb.weight.shape == model.out_head.weight.shape == (50257, 768)


def test_same_seed_gives_the_books_state_dict_key_for_key():
    book, ours = seeded(BookGPTModel), seeded(build_llm.GPTModel)
    book_state, our_state = book.state_dict(), ours.state_dict()
    assert list(our_state) == list(book_state)  # the same keys, masks included, in the same order
    for key, value in book_state.items():
        assert torch.equal(our_state[key].to(value.dtype), value), key


def test_a_book_model_pth_loads_strictly_into_gpt_model(tmp_path):
    book = seeded(BookGPTModel)
    torch.save(book.state_dict(), tmp_path / "model.pth")  # the book's way of saving
    ours = seeded(build_llm.GPTModel, seed=7)
    ours.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))  # strict by default
    torch.testing.assert_close(ours(IDX), book(IDX), atol=1e-5, rtol=1e-5)


def test_our_model_pth_loads_strictly_into_the_books_model(tmp_path):
    ours = seeded(build_llm.GPTModel)
    torch.save(ours.state_dict(), tmp_path / "model.pth")
    book = seeded(BookGPTModel, seed=7)
    book.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))
    torch.testing.assert_close(book(IDX), ours(IDX), atol=1e-5, rtol=1e-5)
    assert torch.equal(book.trf_blocks[0].att.mask, torch.triu(torch.ones(12, 12), diagonal=1))


def test_a_state_dict_without_masks_still_loads_strictly():
    ours = seeded(build_llm.GPTModel)
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith(".att.mask")}
    other = seeded(build_llm.GPTModel, seed=7)
    other.load_state_dict(state)
    torch.testing.assert_close(other(IDX), ours(IDX))


def test_a_mask_that_is_not_causal_is_refused():
    state = seeded(BookGPTModel).state_dict()
    state["trf_blocks.1.att.mask"] = torch.zeros(12, 12)
    with pytest.raises(RuntimeError, match=r"trf_blocks\.1\.att\.mask is not a causal mask"):
        seeded(build_llm.GPTModel).load_state_dict(state)


def test_checkpoints_do_not_store_the_masks(tmp_path):
    from safetensors import safe_open

    ours = seeded(build_llm.GPTModel)
    save_checkpoint(tmp_path / "ckpt", ours)
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.endswith("mask")]
    torch.testing.assert_close(load_checkpoint(tmp_path / "ckpt").model(IDX), ours(IDX))


# Printed in the book's chapter 4 notebook (LLMs-from-scratch, ch04/01_main-chapter-code/ch04.ipynb),
# section 4.4, for torch.manual_seed(123), layer sizes [3, 3, 3, 3, 3, 1] and input [[1., 0., -1.]].
WITHOUT_SHORTCUT = [0.00020173587836325169, 0.0001201116101583466, 0.0007152041653171182,
                    0.001398873864673078, 0.005049646366387606]
WITH_SHORTCUT = [0.22169792652130127, 0.20694105327129364, 0.32896995544433594, 0.2665732502937317,
                 1.3258541822433472]


@pytest.mark.parametrize("use_shortcut, printed", [(False, WITHOUT_SHORTCUT), (True, WITH_SHORTCUT)])
def test_shortcut_example_prints_the_books_gradients(use_shortcut, printed, capsys):
    torch.manual_seed(123)
    model = ch04.ExampleDeepNeuralNetwork([3, 3, 3, 3, 3, 1], use_shortcut=use_shortcut)
    ch04.print_gradients(model, torch.tensor([[1., 0., -1.]]))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" has gradient mean of ")[0] for line in lines] == [f"layers.{i}.0.weight" for i in range(5)]
    values = [float(line.split(" of ")[1]) for line in lines]
    assert values == pytest.approx(printed, rel=1e-5)  # float32 summation order varies across versions
