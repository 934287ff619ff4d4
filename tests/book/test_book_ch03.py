"""Chapter 3's classes print the book's numbers for its 6-token example.

Reference values: the outputs printed in the book's chapter 3 notebook (LLMs-from-scratch,
ch03/01_main-chapter-code/ch03.ipynb, PyTorch 2.2.2), for the embedded sentence
"Your journey starts with one step" and the seeds the book uses.
"""

import pytest
import torch

import build_llm
from build_llm.book.ch03 import (CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper, SelfAttention_v1,
                                 SelfAttention_v2)

pytestmark = pytest.mark.usefixtures("one_thread")

INPUTS = torch.tensor([[0.43, 0.15, 0.89],   # Your
                       [0.55, 0.87, 0.66],   # journey
                       [0.57, 0.85, 0.64],   # starts
                       [0.22, 0.58, 0.33],   # with
                       [0.77, 0.25, 0.10],   # one
                       [0.05, 0.80, 0.55]])  # step
BATCH = torch.stack((INPUTS, INPUTS), dim=0)  # (2, 6, 3)
D_IN, D_OUT = 3, 2


def close(actual, printed):
    # The book prints 4 decimals: equal to within half a unit of the last digit (plus float noise).
    torch.testing.assert_close(actual.detach(), torch.tensor(printed), atol=5.1e-5, rtol=0)


def test_self_attention_v1():
    torch.manual_seed(123)
    close(SelfAttention_v1(D_IN, D_OUT)(INPUTS), [[0.2996, 0.8053], [0.3061, 0.8210], [0.3058, 0.8203],
                                                  [0.2948, 0.7939], [0.2927, 0.7891], [0.2990, 0.8040]])


def test_self_attention_v2_and_its_causal_weights():
    torch.manual_seed(789)
    sa_v2 = SelfAttention_v2(D_IN, D_OUT)
    close(sa_v2(INPUTS), [[-0.0739, 0.0713], [-0.0748, 0.0703], [-0.0749, 0.0702],
                          [-0.0760, 0.0685], [-0.0763, 0.0679], [-0.0754, 0.0693]])
    # Section 3.5.1: the same queries and keys, masked above the diagonal before the softmax.
    queries, keys = sa_v2.W_query(INPUTS), sa_v2.W_key(INPUTS)
    scores = (queries @ keys.T).masked_fill(torch.triu(torch.ones(6, 6), diagonal=1).bool(), -torch.inf)
    close(torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1),
          [[1.0000, 0, 0, 0, 0, 0], [0.5517, 0.4483, 0, 0, 0, 0], [0.3800, 0.3097, 0.3103, 0, 0, 0],
           [0.2758, 0.2460, 0.2462, 0.2319, 0, 0], [0.2175, 0.1983, 0.1984, 0.1888, 0.1971, 0],
           [0.1935, 0.1663, 0.1666, 0.1542, 0.1666, 0.1529]])


CAUSAL_HEAD = [[-0.4519, 0.2216], [-0.5874, 0.0058], [-0.6300, -0.0632],
               [-0.5675, -0.0843], [-0.5526, -0.0981], [-0.5299, -0.1081]]


def test_causal_attention():
    torch.manual_seed(123)
    out = CausalAttention(D_IN, D_OUT, BATCH.shape[1], 0.0)(BATCH)
    assert out.shape == (2, 6, 2)
    close(out, [CAUSAL_HEAD, CAUSAL_HEAD])


def test_causal_attention_is_causal_and_drops_weights_in_training():
    torch.manual_seed(0)
    ca = CausalAttention(D_IN, D_OUT, 6, 0.5)
    ca.eval()
    x = torch.randn(1, 6, 3)
    changed = x.clone()
    changed[0, 4:] += 1.0  # a later token must not change earlier outputs
    torch.testing.assert_close(ca(x)[0, :4], ca(changed)[0, :4])
    ca.train()
    assert not torch.equal(ca(x), ca(x))  # dropout on the weights


def test_multi_head_attention_wrapper_concatenates_heads():
    torch.manual_seed(123)
    out = MultiHeadAttentionWrapper(D_IN, D_OUT, BATCH.shape[1], 0.0, num_heads=2)(BATCH)
    assert out.shape == (2, 6, 4)
    second_head = [[0.4772, 0.1063], [0.5891, 0.3257], [0.6202, 0.3860],
                   [0.5478, 0.3589], [0.5321, 0.3428], [0.5077, 0.3493]]
    close(out, [[a + b for a, b in zip(CAUSAL_HEAD, second_head)]] * 2)


def test_multi_head_attention_is_the_package_class_and_prints_the_books_numbers():
    assert MultiHeadAttention is build_llm.MultiHeadAttention
    torch.manual_seed(123)
    out = MultiHeadAttention(D_IN, D_OUT, BATCH.shape[1], 0.0, num_heads=2)(BATCH)
    assert out.shape == (2, 6, 2)
    rows = [[0.3190, 0.4858], [0.2943, 0.3897], [0.2856, 0.3593],
            [0.2693, 0.3873], [0.2639, 0.3928], [0.2575, 0.4028]]
    close(out, [rows, rows])


def test_the_book_arguments_are_checked():
    with pytest.raises(ValueError, match="d_out=3 is not divisible by num_heads=2"):
        MultiHeadAttention(3, 3, 6, 0.0, num_heads=2)
