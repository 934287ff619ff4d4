"""The model doctor: quick checks that catch the silent bugs of a GPT before hours are spent training it.

Each check returns a `CheckResult` (PASS, FAIL or SKIP, and one line saying what was measured):
- tokenizer round-trip: decode(encode(text)) gives the text back;
- initial loss (untrained models only): an untrained model predicts about uniformly, so its loss
  is near ln(vocab_size); a trained model skips it (its loss on a test text says nothing of its
  initialisation);
- causal mask: changing a future token never changes an earlier position's logits;
- KV cache: logits computed position by position with the cache equal those of one full forward,
  and generation gives the same tokens with and without the cache;
- gradients: one backward pass gives a finite loss and finite gradients for every parameter;
- overfit one batch: a copy of the model, trained on one short sequence, drives its loss near 0.
The model itself is never changed: the training checks work on a copy.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.data.markov import abc_text, is_abc_tokenizer
from build_llm.data.tokenizer import CharTokenizer
from build_llm.infer.generate import generate

# Text for the round-trip and the loss when neither --data nor a known source is given: spaces,
# newlines, punctuation, digits and accents (the course's Portuguese) in one short passage. A
# character tokenizer gets the part of it its alphabet covers, and the alphabet itself.
SAMPLE_TEXT = ("O gato sobe no telhado. Não há nada mais a dizer!\n"
               "Every effort moves you forward; 1, 2, 3 tokens... and then\n\n"
               "  the end — or is it? Ação, coração, 100% café.\n")


@dataclass
class CheckResult:
    name: str
    status: str  # "PASS", "FAIL" or "SKIP"
    detail: str
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        return f"{self.status}  {self.name}: {self.detail} ({self.seconds:.1f}s)"


def _scale(x: torch.Tensor) -> float:
    return 1.0 + float(x.abs().max())


def _lm_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of windows (B, T+1): inputs window[:, :-1], targets window[:, 1:]."""
    logits = model(window[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())


# --- the checks ----------------------------------------------------------------------------------
def check_tokenizer(tokenizer: Any, text: str) -> CheckResult:
    """decode(encode(text)) == text."""
    try:
        ids = tokenizer.encode(text)
        back = tokenizer.decode(ids)
    except (ValueError, TypeError) as e:
        return CheckResult("tokenizer round-trip", "FAIL", f"cannot encode the text: {e}")
    if back == text:
        return CheckResult("tokenizer round-trip", "PASS",
                           f"{len(text):,} characters -> {len(ids):,} tokens -> the same text")
    i = next((k for k, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
    return CheckResult("tokenizer round-trip", "FAIL",
                       f"the text differs from character {i}: {text[i:i + 20]!r} came back as {back[i:i + 20]!r}")


def check_initial_loss(model: nn.Module, batch: torch.Tensor, untrained: bool, tolerance: float = 0.5) -> CheckResult:
    """An untrained model's loss is within `tolerance` nats of ln V; a trained one's is below ln V + tolerance.

    Near-uniform predictions give ln V. Random logits of standard deviation s give about
    ln V + s^2 / 2, so 0.5 nats above ln V means logits spread by about 1 before any training: a
    sign of a too-large initialisation, which costs the first steps of training.
    """
    model.eval()
    with torch.no_grad():
        logits = model(batch[:, :-1]).float()
        loss = float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
    spread = float(logits.std(dim=-1).mean())
    ln_v = math.log(model.cfg.vocab_size)
    msg = (f"loss {loss:.4f} nats on {batch.shape[0]}x{batch.shape[1] - 1} tokens; ln(vocab) = {ln_v:.4f}; "
           f"logit std {spread:.3g}")
    if not math.isfinite(loss):
        return CheckResult("initial loss", "FAIL", msg + ": the loss is not finite")
    if untrained:
        ok = abs(loss - ln_v) <= tolerance
        return CheckResult("initial loss", "PASS" if ok else "FAIL",
                           msg + (f"; within {tolerance} nats: the untrained predictions are near uniform" if ok else
                                  f"; off by more than {tolerance} nats: the initial logits are too spread (check the "
                                  "initialisation scale)"))
    ok = loss <= ln_v + tolerance
    verdict = ("below: the model has learned" if loss < ln_v - tolerance else
               "about uniform: the model looks untrained" if ok else
               "above: worse than a uniform guess on this text")
    return CheckResult("initial loss", "PASS" if ok else "FAIL", f"{msg} (trained model) - {verdict}")


def check_causal(model: nn.Module, idx: torch.Tensor) -> CheckResult:
    """Change the token at each position j in turn; the logits before j must not move."""
    model.eval()
    T, V = idx.shape[1], model.cfg.vocab_size
    variants = idx.repeat(T, 1)  # row j: the sequence with token j replaced
    positions = torch.arange(T)
    variants[positions, positions] = (idx[0] + 1 + torch.arange(T, device=idx.device) % max(V - 1, 1)) % V
    with torch.no_grad():
        base = model(idx)[0].float()  # (T, V)
        changed = model(variants).float()  # (T, T, V): [j, t] = position t when token j changed
    diff = (changed - base[None]).abs().amax(dim=-1)  # (T, T)
    tol = 1e-4 * _scale(base)
    past = torch.stack([diff[j, :j].max() if j else diff.new_zeros(()) for j in range(T)])  # (T,): worst t < j
    worst = int(past.argmax())
    effect = float(diff.diagonal().max())
    if float(past.max()) > tol:
        earlier = int(diff[worst, :worst].argmax())
        return CheckResult("causal mask", "FAIL",
                           f"the future leaks: changing token {worst} moved the logits at position {earlier} by "
                           f"{float(past.max()):.3g} (tolerance {tol:.2g})")
    return CheckResult("causal mask", "PASS",
                       f"changing any of {T} tokens never moved an earlier logit (max {float(past.max()):.2g}, "
                       f"tolerance {tol:.2g}); its own position moved by up to {effect:.3g}")


def check_kv_cache(model: nn.Module, idx: torch.Tensor, new_tokens: int = 8) -> CheckResult:
    """Logits with the cache (prompt, then one token at a time) equal one full forward; generation
    gives the same tokens with and without the cache."""
    model.eval()
    T = idx.shape[1]
    half = max(1, T // 2)
    with torch.no_grad():
        full = model(idx)[0].float()  # (T, V)
        cache = model.new_cache(1)
        parts = [model(idx[:, :half], cache=cache)[0]]
        for t in range(half, T):
            parts.append(model(idx[:, t:t + 1], cache=cache)[0])
    stepped = torch.cat(parts).float()
    err = float((stepped - full).abs().max())
    tol = 1e-4 * _scale(full)
    prompt = idx[:, :half]
    n = max(1, min(new_tokens, model.cfg.context_length - half))
    with_cache = generate(model, prompt, n, use_cache=True)
    without = generate(model, prompt, n, use_cache=False)
    same = torch.equal(with_cache, without)
    ok = err <= tol and same
    detail = (f"cached logits differ from the full forward by {err:.2g} (tolerance {tol:.2g}); greedy generation of "
              f"{n} tokens {'is the same' if same else 'DIFFERS'} with and without the cache")
    return CheckResult("KV cache", "PASS" if ok else "FAIL", detail)


def _trainable_copy(model: nn.Module) -> nn.Module:
    """A copy in training mode without dropout, so that its loss curve is deterministic; every weight
    trains (a LoRA run, merged, keeps its base's frozen flags)."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(True)
    for m in twin.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return twin.train()


def check_gradients(model: nn.Module, window: torch.Tensor) -> CheckResult:
    """One forward and backward on a copy: the loss and every parameter's gradient are finite."""
    twin = _trainable_copy(model)
    loss = _lm_loss(twin, window)
    loss.backward()
    params = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    bad = [n for n, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for _, p in params if p.grad is not None and not bad))
    if not math.isfinite(loss.item()) or bad:
        return CheckResult("gradients", "FAIL", f"loss {loss.item():.4g}; non-finite gradients in {bad[:4]}")
    if missing:
        return CheckResult("gradients", "FAIL", f"no gradient reaches {len(missing)} parameter(s), e.g. {missing[:3]}")
    return CheckResult("gradients", "PASS", f"all {len(params)} parameter tensors have finite gradients "
                                            f"(global norm {norm:.3g})")


def check_overfit(model: nn.Module, window: torch.Tensor, steps: int = 60, lr: float = 1e-3,
                  target: float = 0.05) -> CheckResult:
    """Train a copy on one sequence with AdamW; its loss must fall below `target` nats within
    `steps` steps. A model that cannot memorise one short sequence will not learn a corpus."""
    twin = _trainable_copy(model)
    optimizer = torch.optim.AdamW(twin.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss = _lm_loss(twin, window)
        losses.append(loss.item())
        if losses[-1] < target or not math.isfinite(losses[-1]):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        optimizer.step()
    ok = losses[-1] < target
    return CheckResult("overfit one batch", "PASS" if ok else "FAIL",
                       f"loss {losses[0]:.4f} -> {losses[-1]:.4f} nats in {len(losses) - 1} AdamW steps (lr {lr:g}) on "
                       f"{window.shape[1] - 1} tokens; {'below' if ok else 'NOT below'} {target} within {steps}")


def check_untrained_loss(model: nn.Module, batch: torch.Tensor, untrained: bool | None,
                         tolerance: float = 0.5) -> CheckResult:
    """The initial-loss check for an untrained model; a SKIP for a trained one. `untrained` None: not
    known, so a loss far below ln V (more than `tolerance`) shows a trained model, and any other is
    checked as an untrained model's."""
    if untrained is None:
        model.eval()
        with torch.no_grad():
            loss = float(_lm_loss(model, batch))
        ln_v = math.log(model.cfg.vocab_size)
        untrained = not loss < ln_v - tolerance
        if not untrained:
            return CheckResult("initial loss", "SKIP", f"loss {loss:.4f} nats on {batch.shape[0]}x{batch.shape[1] - 1} "
                                                       f"tokens; ln(vocab) = {ln_v:.4f}: far below, a trained model; "
                                                       "the check is for untrained models")
    if untrained:
        return check_initial_loss(model, batch, untrained=True, tolerance=tolerance)
    return CheckResult("initial loss", "SKIP", "a trained model (its trainer state records training steps); the "
                                               "check is for untrained models, whose loss must be near ln(vocab)")


# --- running them all ----------------------------------------------------------------------------
def doctor_text(tokenizer: Any, text: str | None) -> tuple[str, str]:
    """The text the checks use and where it came from: the data, ABC text for an ABC model, or a
    sample the tokenizer covers (a character tokenizer cannot encode a character it never saw)."""
    if text is not None:
        return text, "the data"
    if is_abc_tokenizer(tokenizer):
        return abc_text(400, seed=0), "ABC text sampled from the source"
    if isinstance(tokenizer, CharTokenizer):
        alphabet = tokenizer.vocab[1:]
        sample = "".join(c for c in SAMPLE_TEXT if c in set(alphabet))
        return sample + "".join(alphabet), "the built-in sample in the tokenizer's alphabet, then the alphabet"
    return SAMPLE_TEXT, "a built-in sample text"


def run_checks(model: nn.Module, tokenizer: Any = None, text: str | None = None, *, untrained: bool | None = None,
               steps: int = 60, lr: float = 1e-3, seq_len: int = 16, seed: int = 0) -> Iterator[CheckResult]:
    """Run every check in turn (cheapest first) and yield its result; `text` is the data to use.

    `untrained` says whether the model is freshly initialised, so that its loss must be near
    ln(vocab_size); a trained model skips that check; None: decided by the loss (check_untrained_loss).
    A check that raises is reported as a FAIL with the error.
    """
    was_training = model.training
    device = model.tok_emb.weight.device
    generator = torch.Generator().manual_seed(seed)
    V, ctx = model.cfg.vocab_size, model.cfg.context_length
    T = max(2, min(ctx, seq_len))
    ids: list[int] = []
    source = "random tokens"
    if tokenizer is not None:
        text, source = doctor_text(tokenizer, text)
        try:
            ids = tokenizer.encode(text[:200_000])
        except (ValueError, TypeError):
            ids = []
    if len(ids) >= T + 1:
        starts = torch.randint(0, len(ids) - T, (8,), generator=generator)
        batch = torch.tensor(ids)[starts[:, None] + torch.arange(T + 1)]
    else:
        source = "random tokens"
        batch = torch.randint(0, V, (8, T + 1), generator=generator)
    batch = batch.to(device)  # (8, T + 1): the loss and the gradients
    window = batch[:1]  # (1, T + 1): one sequence to overfit
    idx = window[:, :T]

    checks: list[tuple[str, Callable[[], CheckResult]]] = []
    if tokenizer is not None:
        checks.append(("tokenizer round-trip", lambda: check_tokenizer(tokenizer, text)))
    checks += [
        ("initial loss", lambda: _note(check_untrained_loss(model, batch, untrained), source)),
        ("causal mask", lambda: check_causal(model, idx)),
        ("KV cache", lambda: check_kv_cache(model, idx)),
        ("gradients", lambda: check_gradients(model, batch)),
        ("overfit one batch", lambda: check_overfit(model, window, steps, lr)),
    ]
    try:
        for name, check in checks:
            t0 = time.perf_counter()
            try:
                result = check()
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                result = CheckResult(name, "FAIL", f"raised {type(e).__name__}: {' '.join(str(e).split())}")
            result.seconds = time.perf_counter() - t0
            yield result
    finally:
        model.train(was_training)


def _note(result: CheckResult, source: str) -> CheckResult:
    result.detail = result.detail.replace(" tokens;", f" tokens of {source};", 1)
    return result
