"""Tests for build_llm.infer.classify: the class scores are the logits of each text's last real token."""

from __future__ import annotations

import pytest
import torch

from build_llm import GPTModel
from build_llm.data.classify import collate_classification
from build_llm.data.instruct import Example
from build_llm.infer.classify import last_token_logits
from build_llm.store.finetuned import prepare_classifier

from tiny import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_classification_reads_the_last_real_token():
    torch.manual_seed(0)
    model = prepare_classifier(GPTModel(tiny_cfg(50)), 3).eval()
    short, long = Example([5, 6, 7], 0), Example([8, 9, 10, 11, 12, 13], 2)
    x, lengths, labels = collate_classification([short, long], pad_id=0)
    with torch.no_grad():
        both = last_token_logits(model, x, lengths)
        alone = model(torch.tensor([[5, 6, 7]]))[0, -1]
    assert both.shape == (2, 3) and labels.tolist() == [0, 2]
    torch.testing.assert_close(both[0], alone, rtol=0, atol=1e-6)
