"""Muon: momentum, orthogonalised by a Newton-Schulz iteration, for the 2-D weight matrices of the
transformer blocks; AdamW for everything else (embeddings, the output head, norms, biases).

Muon (Keller Jordan, 2024) replaces each matrix's update by the nearest semi-orthogonal matrix to
its momentum, U V^T of the momentum's SVD U S V^T: every direction of the update moves by the same
amount, so rare directions are not drowned by the dominant ones. Five steps of a quintic
Newton-Schulz iteration approximate U V^T with matrix products only (no SVD), which is cheap next to
the forward and backward pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn


from .errors import UsageError

# Coefficients of the quintic iteration X <- a X + (b A + c A^2) X, A = X X^T: chosen (by Muon's
# author) to push every singular value into roughly [0.7, 1.2] fast rather than exactly to 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T for the matrix g = U S V^T (g of shape (rows, cols))."""
    if g.ndim != 2:
        raise ValueError(f"orthogonalize: expected a matrix, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.float() / (g.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the basin
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide side: A = X X^T is then the smaller square
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised, for 2-D parameters only.

    The update of a (rows, cols) matrix is scaled by sqrt(max(1, rows / cols)) so that its RMS does
    not shrink for tall matrices; decoupled weight decay as in AdamW.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5) -> None:
        if not lr > 0:
            raise UsageError(f"Muon: lr={lr!r} is invalid; expected a number > 0")
        if not 0 <= momentum < 1:
            raise UsageError(f"Muon: momentum={momentum!r} is invalid; expected a number in [0, 1)")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon: parameters must be matrices, got shape {tuple(p.shape)}; "
                                     "give vectors and embeddings to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                update = orthogonalize(g, group["ns_steps"])
                scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)
        return loss


def muon_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(matrices for Muon, the rest for AdamW): the 2-D weights inside the transformer blocks go to
    Muon; embeddings and the output head stay with AdamW (they are lookup tables and a classifier,
    not maps between hidden spaces), as do all vectors."""
    blocks = getattr(model, "trf_blocks", None)
    if blocks is None:
        raise ValueError("muon_params: expected a GPTModel (with trf_blocks)")
    in_blocks = {id(p) for p in blocks.parameters()}
    head = {id(p) for p in (model.tok_emb.weight, model.out_head.weight)}
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.ndim == 2 and id(p) in in_blocks and id(p) not in head]
    chosen = {id(p) for p in matrices}
    return matrices, [p for p in params if id(p) not in chosen]
