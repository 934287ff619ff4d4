"""MoEFeedForward: a mixture of SwiGLU experts, each token routed to a few of them (Qwen3-MoE, Mixtral).

A router (`gate`, Linear emb_dim -> n_experts, no bias) scores the experts for each token; softmax
turns the scores into probabilities, the top `n_experts_per_token` are kept (renormalised to sum
to 1 when `moe_norm_topk`, as Qwen3-MoE does), and the token's output is the probability-weighted
sum of those experts' SwiGLU outputs. A token costs the router plus its chosen experts, never all
of them: the (token, expert) pairs are grouped by expert and each chosen expert runs once, on its
own tokens.

The experts' weights are stacked, one tensor per projection, in Linear's (out, in) layout: expert
e is `fc3[e] @ (silu(fc1[e] @ x) * (fc2[e] @ x))` (the book's fc1, fc2, fc3 for gate, up, down).
One (n_experts, ...) tensor per projection keeps a 128-expert layer three parameters, not 384.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.config import GPTConfig


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        n, hidden, emb = cfg.n_experts, cfg.expert_hidden, cfg.emb_dim
        self.n_experts, self.n_experts_per_token, self.norm_topk = n, cfg.n_experts_per_token, cfg.moe_norm_topk
        self.gate = nn.Linear(emb, n, bias=False)  # the router
        self.fc1 = nn.Parameter(torch.empty(n, hidden, emb))  # (E, H, C): each expert's gate projection
        self.fc2 = nn.Parameter(torch.empty(n, hidden, emb))  # (E, H, C): up projection
        self.fc3 = nn.Parameter(torch.empty(n, emb, hidden))  # (E, C, H): down projection
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert's matrices drawn as nn.Linear draws its own: uniform in +-1/sqrt(fan_in)."""
        for w in (self.fc1, self.fc2, self.fc3):
            bound = 1 / math.sqrt(w.shape[-1])
            w.uniform_(-bound, bound)

    @property
    def out_proj(self) -> nn.Parameter:
        """The weights that write back into the residual stream (GPT-2's initialisation scales them)."""
        return self.fc3

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For tokens x (N, C): the chosen experts (N, k) and their weights (N, k), in x's dtype.
        The softmax is taken in float32 whatever x's dtype, as Qwen3-MoE takes it. Among equal
        probabilities the lower expert index is chosen first: a stable sort, where `topk` leaves ties in
        whatever order its selection algorithm ends with (on the CPU, 4 equal probabilities' top-2 is
        experts 2 and 3), an order the compiled decoding step (infer/kernels.c) could not reproduce."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, E)
        weights, experts = probs.sort(dim=-1, descending=True, stable=True)  # (N, E)
        k = self.n_experts_per_token
        weights, experts = weights[:, :k], experts[:, :k]  # (N, k)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights.to(x.dtype)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on its tokens x (n, C) -> (n, C)."""
        return F.linear(F.silu(F.linear(x, self.fc1[e])) * F.linear(x, self.fc2[e]), self.fc3[e])

    def forward(self, x: torch.Tensor, expert: Callable[[int, torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
        """`expert(e, x)` computes expert e (default: self.expert; LoRA's MoEWithLoRA adds its adapters)."""
        expert = expert or self.expert
        b, num_tokens, emb = x.shape
        x = x.reshape(b * num_tokens, emb)  # (N, C): routing is per token
        experts, weights = self.route(x)  # (N, k) each
        k = experts.shape[1]
        # Group the N*k (token, expert) pairs by expert: pair j is token j // k's choice number j % k.
        pairs, pair_weights = experts.flatten(), weights.flatten()  # (N*k,) each
        order = pairs.argsort(stable=True)  # pair ids, expert 0's first
        counts = torch.bincount(pairs, minlength=self.n_experts).tolist()
        out = torch.zeros_like(x)  # (N, C)
        for e, chosen in zip(range(self.n_experts), order.split(counts)):
            if len(chosen):  # an expert no token chose costs nothing
                tokens = chosen // k  # (n,)
                out.index_add_(0, tokens, expert(e, x[tokens]) * pair_weights[chosen, None])  # (n, C) added
        return out.view(b, num_tokens, emb)  # (B, T, C)
