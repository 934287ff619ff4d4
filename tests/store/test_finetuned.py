"""Tests for build_llm.store.finetuned: the book's classifier head recipe (loading, saving and merging
fine-tuned checkpoints run end to end in tests/train/test_finetune.py)."""

from __future__ import annotations

import pytest

from build_llm import GPTModel
from build_llm.store.finetuned import prepare_classifier

from tiny import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prepare_classifier_is_the_books_recipe():
    model = prepare_classifier(GPTModel(tiny_cfg(50)), 4)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("trf_blocks") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"out_head", "trf_blocks.1", "final_norm"}
    assert model.out_head.weight.shape == (4, 32) and model.out_head.bias is not None
    with pytest.raises(ValueError, match="num_classes"):
        prepare_classifier(GPTModel(tiny_cfg(50)), 1)


def test_prepare_classifier_can_train_every_weight():
    model = prepare_classifier(GPTModel(tiny_cfg(50)), 3, trainable="all")
    assert all(p.requires_grad for p in model.parameters()) and model.out_head.weight.shape == (3, 32)
    frozen = prepare_classifier(GPTModel(tiny_cfg(50)), 3, train_last_block=False, trainable="all")  # LoRA's
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["out_head.weight", "out_head.bias"]
    with pytest.raises(ValueError, match="trainable='head'"):
        prepare_classifier(GPTModel(tiny_cfg(50)), 3, trainable="head")
