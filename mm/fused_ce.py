"""Cross-entropy through a frozen LM head, fused with its backward.

Notation: s=labelled positions, d=LLM width, V=vocabulary, c=chunk of positions.

With the head frozen, the only gradient needed is the one of the hidden states,
``(softmax(h W^T) - onehot) W``, and it can be computed right away, chunk by chunk, during
the forward pass. So no (s, V) logits are kept for the backward pass (the plain chunked
loss keeps fp32 log-probabilities of every chunk until ``backward``), and the softmax is
computed once instead of twice. Logits are formed in the weight's dtype and reduced in fp32,
as the plain loss does.

On a CUDA device the softmax, the loss and the subtraction of the one-hot run as one Triton
kernel (:func:`softmax_grad_`) that reads each chunk's logits twice and overwrites them with
the gradient of the logits: no fp32 (c, V) probabilities, no cast, no separate gathers and
maxima (PyTorch has no such fused op). Elsewhere, or with ``MM_FUSED_CE_TRITON=0``, the same
steps run as PyTorch ops.
"""

from __future__ import annotations

import functools
import os

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


@functools.cache
def _kernel():
    """The Triton kernel, or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def softmax_grad_rows(x_ptr, t_ptr, nll_ptr, stride, V: tl.constexpr, BLOCK: tl.constexpr,
                          WRITE: tl.constexpr):
        # one program a row: pass 1 an online max and sum of exponentials over the row, in
        # fp32 (a running max and sum per lane, merged at the end); pass 2 writes
        # softmax - onehot over the logits in their dtype
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        cols = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], -3.0e38, tl.float32)  # finite: a lane past V keeps exp(m - m) = 1, z = 0
        z = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            z = z * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(z * tl.exp(m - mx), 0))
        t = tl.load(t_ptr + row)
        tl.store(nll_ptr + row, lse - tl.load(base + t).to(tl.float32))
        if WRITE:
            for start in range(0, V, BLOCK):
                c = start + cols
                x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0)
                tl.store(base + c, g.to(x_ptr.dtype.element_ty), mask=c < V)

    return softmax_grad_rows


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("MM_FUSED_CE_TRITON", "1") != "0" and _kernel() is not None


def softmax_grad_(logits: torch.Tensor, target: torch.Tensor, write: bool = True,
                  block: int = 4096, num_warps: int = 8) -> torch.Tensor:
    """Per-row ``cross_entropy(logits, target)`` in fp32 (``lse - logit of the target``);
    with ``write``, ``logits`` is overwritten with ``softmax(logits) - onehot(target)`` in its
    own dtype (the reductions in fp32). ``logits`` (c, V) with unit stride along V. Triton
    (on a CPU too, under ``TRITON_INTERPRET=1``, which the tests use)."""
    c, v = logits.shape
    assert logits.stride(1) == 1, "logits need unit stride along the vocabulary"
    nll = torch.empty(c, dtype=torch.float32, device=logits.device)
    block = min(block, 1 << max(0, v - 1).bit_length())
    if c:
        _kernel()[(c,)](logits, target, nll, logits.stride(0), V=v, BLOCK=block, WRITE=write,
                        num_warps=num_warps)
    return nll


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
        s = h.shape[0]
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(h) if need_grad else None  # (s, d)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        if use_triton(h):
            for i in range(0, s, chunk):
                logits = h[i:i + chunk] @ weight.t()  # (c, V), becomes the logits' gradient
                total += softmax_grad_(logits, target[i:i + chunk], write=need_grad).sum()
                if need_grad:
                    torch.mm(logits, weight, out=grad[i:i + chunk])
                del logits
            ctx.save_for_backward(grad if need_grad else None)
            return total
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
