"""Classification with a fine-tuned classifier (`build-llm classify`): the logits of each text's last
real token (not padding) are its class scores."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from build_llm.data.classify import collate_classification, encode_text
from build_llm.data.instruct import Example
from build_llm.errors import UsageError


def last_token_logits(model: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Logits (B, C) at each row's last real token."""
    logits = model(inputs)  # (B, T, C)
    return logits[torch.arange(inputs.shape[0], device=inputs.device), lengths.to(inputs.device) - 1]


@torch.no_grad()
def classify_texts(model: nn.Module, tokenizer: Any, labels: Sequence[str], texts: Sequence[str],
                   max_length: int | None = None, batch_size: int = 16) -> list[dict[str, Any]]:
    """For each text: {"label": most probable label, "probabilities": {label: p}}."""
    limit = min(max_length or model.cfg.context_length, model.cfg.context_length)
    device = next(model.parameters()).device
    pad = getattr(tokenizer, "eos_id", None) or 0
    results = []
    for i in range(0, len(texts), batch_size):
        examples = [Example(encode_text(tokenizer, t, limit), 0) for t in texts[i:i + batch_size]]
        inputs, lengths, _ = collate_classification(examples, pad)
        probas = torch.softmax(last_token_logits(model, inputs.to(device), lengths).float(), dim=-1)
        if not torch.isfinite(probas).all():  # else the JSON line would hold the invalid token NaN
            raise UsageError("the model's class scores are NaN: its weights hold NaN or infinity (a damaged "
                             "checkpoint or a diverged run); load another checkpoint")
        for row in probas.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append({"label": labels[best], "probabilities": dict(zip(labels, row))})
    return results
