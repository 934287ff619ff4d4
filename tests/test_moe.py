"""MoEFeedForward: the same function as transformers' Qwen3-MoE sparse block, at the cost of the chosen
experts only; the config fields that build it, and GPTModel with it."""

import pytest
import torch

from build_llm import GPTConfig, GPTModel
from build_llm.errors import UsageError
from build_llm.moe import MoEFeedForward

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread waits on no other

MOE = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, bias=False,
                pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_experts=6, n_experts_per_token=2, moe_ff_dim=24)


def hf_sparse_block(cfg: GPTConfig):
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = transformers.Qwen3MoeConfig(hidden_size=cfg.emb_dim, moe_intermediate_size=cfg.expert_hidden,
                                         num_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_token,
                                         norm_topk_prob=cfg.moe_norm_topk, num_attention_heads=cfg.n_heads)
    return Qwen3MoeSparseMoeBlock(hf_cfg)


def copy_into_hf(ours: MoEFeedForward, hf) -> None:
    """Our weights into transformers' block, whichever layout its version keeps the experts in."""
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        experts = hf.experts
        if hasattr(experts, "gate_up_proj"):  # transformers 5: (E, 2H, C) with gate first, and (E, C, H)
            experts.gate_up_proj.copy_(torch.cat([ours.fc1, ours.fc2], dim=1))
            experts.down_proj.copy_(ours.fc3)
        else:  # transformers 4: a ModuleList of Qwen3MoeMLP
            for e, mlp in enumerate(experts):
                mlp.gate_proj.weight.copy_(ours.fc1[e])
                mlp.up_proj.weight.copy_(ours.fc2[e])
                mlp.down_proj.weight.copy_(ours.fc3[e])


@pytest.mark.parametrize("norm_topk", [True, False])
def test_equals_transformers_qwen3_moe_sparse_block(norm_topk):
    cfg = MOE.replace(moe_norm_topk=norm_topk)
    torch.manual_seed(0)
    ours = MoEFeedForward(cfg)
    with torch.no_grad():  # a router that prefers some experts, so routing is not a near-tie everywhere
        ours.gate.weight.normal_(0, 1.0)
    hf = hf_sparse_block(cfg)
    copy_into_hf(ours, hf)
    x = torch.randn(3, 7, cfg.emb_dim)
    out = hf(x)
    expected = out[0] if isinstance(out, tuple) else out  # transformers 4 also returns the router logits
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_equals_the_dense_mixture_written_out():
    """Every expert on every token, weighted by the top-k probabilities (zero elsewhere): the definition."""
    torch.manual_seed(1)
    ff = MoEFeedForward(MOE.replace(moe_norm_topk=True))
    x = torch.randn(2, 5, MOE.emb_dim)
    probs = torch.softmax(x @ ff.gate.weight.T, dim=-1)  # (B, T, E)
    top, idx = probs.topk(2, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))  # (B, T, E)
    every = torch.stack([torch.nn.functional.silu(x @ ff.fc1[e].T) * (x @ ff.fc2[e].T) @ ff.fc3[e].T
                         for e in range(MOE.n_experts)], dim=-2)  # (B, T, E, C)
    torch.testing.assert_close(ff(x), (weights[..., None] * every).sum(-2), atol=1e-5, rtol=1e-5)


def test_runs_only_the_chosen_experts_once_each():
    torch.manual_seed(2)
    ff = MoEFeedForward(MOE)
    calls = []
    original = ff.expert
    ff.expert = lambda e, x: calls.append((e, x.shape[0])) or original(e, x)
    x = torch.randn(2, 9, MOE.emb_dim)
    ff(x)
    _, chosen = torch.softmax(ff.gate(x), -1).topk(MOE.n_experts_per_token, dim=-1)  # (B, T, k)
    expected = {e: int((chosen == e).sum()) for e in range(MOE.n_experts) if (chosen == e).any()}
    assert dict(calls) == expected  # each chosen expert once, on exactly the tokens routed to it
    assert len(calls) == len(expected)
    assert sum(n for _, n in calls) == 2 * 9 * MOE.n_experts_per_token  # k rows per token, not n_experts

    ff.expert = lambda e, x: calls.append((e, x.shape[0])) or original(e, x)
    calls.clear()
    ff(x[:1, :1])  # one token: exactly k expert calls of one row
    assert sorted(n for _, n in calls) == [1] * MOE.n_experts_per_token


def test_equal_probabilities_choose_the_lowest_experts_first():
    # torch.topk leaves ties in its selection algorithm's order (on the CPU, 4 equal probabilities' top-2 is experts
    # 2 and 3); the route is defined (and the compiled decoding step follows it): the lowest indices, in order.
    ff = MoEFeedForward(MOE.replace(moe_norm_topk=True))
    with torch.no_grad():
        ff.gate.weight.zero_()
        ff.gate.weight[3, 0] = ff.gate.weight[5, 0] = 1.0  # experts 3 and 5 tie above the four others' tie
    experts, weights = ff.route(torch.tensor([[0.0] * MOE.emb_dim, [1.0] + [0.0] * (MOE.emb_dim - 1)]))
    assert experts.tolist() == [[0, 1], [3, 5]]
    assert weights.tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_gradients_reach_router_and_chosen_experts():
    torch.manual_seed(3)
    ff = MoEFeedForward(MOE)
    x = torch.randn(1, 1, MOE.emb_dim)
    ff(x).sum().backward()
    assert ff.gate.weight.grad.abs().sum() > 0
    used = ff.fc1.grad.flatten(1).abs().sum(1) > 0  # (E,)
    assert int(used.sum()) == MOE.n_experts_per_token


def test_config_validation_and_defaults():
    assert GPTConfig().n_experts == 0  # the book's model stays dense
    with pytest.raises(UsageError, match="n_experts_per_token=7 exceeds n_experts=6"):
        MOE.replace(n_experts_per_token=7)
    with pytest.raises(UsageError, match="mlp='swiglu'"):
        MOE.replace(mlp="gelu")
    with pytest.raises(UsageError, match="n_experts"):
        MOE.replace(n_experts=-1)
    assert MOE.replace(moe_ff_dim=None).expert_hidden == MOE.ff_hidden


def test_gpt_model_with_experts_caches_and_counts():
    torch.manual_seed(4)
    model = GPTModel(MOE).eval()
    assert all(isinstance(b.ff, MoEFeedForward) for b in model.trf_blocks)
    idx = torch.randint(0, MOE.vocab_size, (2, 10))
    full = model(idx)
    cache = model.new_cache(2)
    step = torch.cat([model(idx[:, :6], cache)] + [model(idx[:, i:i + 1], cache) for i in range(6, 10)], dim=1)
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_gpt2_initialisation_scales_the_experts_down_projection():
    torch.manual_seed(5)
    cfg = MOE.replace(n_layers=8, emb_dim=64, moe_ff_dim=256, init_std=0.02)
    ff = GPTModel(cfg).trf_blocks[0].ff
    assert ff.fc1.std().item() == pytest.approx(0.02, rel=0.05)
    assert ff.fc3.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # / sqrt(2 * n_layers)


def test_lora_adapts_the_experts_and_never_the_router():
    """'ff' on a mixture means its experts' stacked projections (test_lora.py checks their arithmetic)."""
    from build_llm.lora import MoEWithLoRA, apply_lora

    model = GPTModel(MOE)
    names = apply_lora(model, rank=2, alpha=4)  # the default targets: attn and ff
    assert len(names) == 2 * (4 + 3)  # q, k, v, out and the experts' fc1, fc2, fc3 per block
    assert all(isinstance(b.ff, MoEWithLoRA) and type(b.ff.moe.gate) is torch.nn.Linear for b in model.trf_blocks)
    assert not any("gate" in n for n in names)
