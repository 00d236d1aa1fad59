"""Cross-entropy through a frozen LM head, fused with its backward.

Notation: s=labelled positions, d=LLM width, V=vocabulary, c=chunk of positions.

With the head frozen, the only gradient needed is the one of the hidden states,
``(softmax(h W^T) - onehot) W``, and it can be computed right away, chunk by chunk, during
the forward pass. So no (s, V) logits are kept for the backward pass (the plain chunked
loss keeps fp32 log-probabilities of every chunk until ``backward``), and the softmax is
computed once instead of twice. Logits are formed in the weight's dtype and reduced in fp32,
as the plain loss does.
"""

from __future__ import annotations

import torch


TINY = 1e-30  # probabilities at or below this are 0 here (the loss of such a target is exact anyway)


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 softmax over the vocabulary. On a CPU the entries at or below :data:`TINY` are set
    to 0: once the model is confident most of a row's ~50K probabilities are subnormal
    floats, and an x86 CPU takes a slow path for every product with them (``p @ W`` with
    half its entries subnormal: 3.3 s instead of 57 ms on an Intel Xeon). The video demo's
    training steps slowed from ~0.8 s to ~1.5 s as its loss fell. Dropping them changes the
    gradient by at most 1e-30 x |W| per entry."""
    p = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return torch.nn.functional.threshold_(p, TINY, 0.0) if p.device.type == "cpu" else p


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
        s = h.shape[0]
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(h) if need_grad else None  # (s, d)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, s, chunk):
            hc, tc = h[i:i + chunk], target[i:i + chunk]
            n = tc.shape[0]
            rows = torch.arange(n, device=h.device)
            logits = hc @ weight.t()  # (c, V) in the weight's dtype, as nn.Linear gives
            p = _probs(logits)  # (c, V)
            p_t = p[rows, tc]  # (c,)
            # -log p_t, unless p_t underflows; then lse - x_t with lse = max - log(p_max)
            nll = -p_t.log()
            small = p_t <= TINY
            # on a CPU the two (c, V) max passes cost ~10% of this loss, so they run only for
            # the rows that underflow; on an accelerator that test would be a host sync
            if h.device.type != "cpu" or bool(small.any()):
                x_t = logits[rows, tc].float()
                exact = logits.amax(-1).float() - p.amax(-1).log() - x_t
                nll = torch.where(small, exact, nll)
            total += nll.sum()
            if need_grad:
                p[rows, tc] -= 1.0
                grad[i:i + chunk] = p.to(weight.dtype) @ weight  # (c, d)
            del logits, p
        ctx.save_for_backward(grad if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype) if grad is not None else None), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         chunk: int = 4096) -> torch.Tensor:
    """Sum over positions of ``cross_entropy(h @ weight.T, target)``, fp32.

    Args:
        h: (s, d) hidden states (may require grad).
        weight: (V, d) frozen LM head weight (never gets a gradient).
        target: (s,) long, every entry a valid class.
        chunk: positions per chunk (bounds the (c, V) temporaries).
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy is for a frozen head (weight.requires_grad is True)")
    return _LinearCrossEntropy.apply(h, weight, target, chunk)
