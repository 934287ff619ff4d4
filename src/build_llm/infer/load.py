"""A checkpoint's language model, loaded for decoding or scoring: a plain checkpoint, an instruction
fine-tune, or a LoRA run (its adapter merged into the base, in memory).

With a decoding dtype, a checkpoint's weights are read part by part and each part is converted before
the next is read (store.checkpoint.load_parts with quant.convert_for_decoding), so the peak is about the
decoding size plus one part in float32 (sizing.decoding_memory), not the float32 model plus its copy.
A LoRA run is the exception: its adapter applies to the whole float32 base, which is merged first and
converted after (sizing.model_memory of float32 plus the decoding weights).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from build_llm.config import GPTConfig
from build_llm.errors import UsageError
from build_llm.infer.quant import INT4_GROUP, check_decode_dtype, convert_for_decoding, finish_decoding, prepare_for_decoding
from build_llm.runtime import check_fits
from build_llm.sizing import decoding_memory, model_memory
from build_llm.store.checkpoint import CONFIG_FILE, load_checkpoint
from build_llm.store.finetuned import load_language_model, read_finetune_meta, resolve_finetuned
from build_llm.store.fsio import read_json


def load_decoder(checkpoint: str | Path, device: str | torch.device = "cpu",
                 dtype: str | None = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None) of a checkpoint whose head predicts the next token (a
    classifier is refused). With `dtype` (quant.DECODE_DTYPES) the model is ready for decoding in it."""
    if dtype is not None:
        check_decode_dtype(dtype, device)  # before reading anything
    try:
        path = resolve_finetuned(checkpoint)
    except UsageError:  # no finetune.json: a plain checkpoint
        path = None
    meta = None if path is None else read_finetune_meta(path)
    if meta is not None and (meta.get("lora") or meta["task"] != "instruct"):  # a classifier is refused there
        return _merged(path, device, dtype)
    if dtype is None:
        ckpt = load_checkpoint(path or checkpoint, device)
        return ckpt.model, ckpt.tokenizer
    ckpt = load_checkpoint(path or checkpoint, device, functools.partial(convert_for_decoding, dtype=dtype),
                           functools.partial(decoding_memory, dtype=dtype, group=INT4_GROUP))
    return finish_decoding(ckpt.model, dtype), ckpt.tokenizer


def _merged(path: Path, device: str | torch.device, dtype: str | None) -> tuple[nn.Module, Any]:
    """A LoRA run merged into its float32 base (a classifier refused by load_language_model), then converted."""
    if dtype not in (None, "float32"):
        try:
            cfg = GPTConfig.from_dict(read_json(path / CONFIG_FILE))
        except (UsageError, OSError, TypeError, ValueError):  # load_language_model says what is wrong
            cfg = None
        if cfg is not None:
            check_fits(model_memory(cfg) + decoding_memory(cfg, dtype, group=INT4_GROUP),
                       f"the model of checkpoint {str(path)!r} in {dtype}", device)
    model, tokenizer = load_language_model(path, device)
    return (model.eval() if dtype is None else prepare_for_decoding(model, dtype)), tokenizer
