"""The fused cross-entropy through a frozen LM head on a GPU, at the bench's 1B-xattn shapes
(8 x 1023 positions, Llama-3.2-1B's 2048 x 128,256 head, bf16): forward and backward with the
Triton kernel (mm.fused_ce.softmax_grad_) against the same loss in PyTorch ops
(MM_FUSED_CE_TRITON=0), and the kernel alone at a few block sizes. Prints a table; ~20 s.

    python3 scripts/ce_bench.py [--rows 8184] [--vocab 128256] [--width 2048]
"""
from __future__ import annotations

import argparse
import os

import torch
from sdpa_paths import time_call  # run as scripts/ce_bench.py: its folder is on the path

from mm.fused_ce import linear_cross_entropy, softmax_grad_


def timed(fn) -> float:
    """Median milliseconds of 11 calls after 2 (the figures of 2026-11-28: 10 after 3)."""
    return time_call(fn, reps=11)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8184)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--width", type=int, default=2048)
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(a.rows, a.width, device=dev, dtype=dt, generator=g).requires_grad_(True)
    w = torch.randn(a.vocab, a.width, device=dev, dtype=dt, generator=g) * 0.02
    t = torch.randint(0, a.vocab, (a.rows,), device=dev, generator=g)

    def step():
        linear_cross_entropy(h, w, t).backward()

    res = {}
    for name, flag in (("torch ops", "0"), ("triton", "1")):
        os.environ["MM_FUSED_CE_TRITON"] = flag
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res[name] = timed(step)
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        h.grad = None
        loss = linear_cross_entropy(h, w, t)
        loss.backward()
        res[name + " grad"] = (loss.item(), h.grad.float().clone())
        h.grad = None
        print(f"loss fwd+bwd, {name:9s}: {res[name]:7.2f} ms  peak +{peak:.2f} GiB  loss {loss.item():.4f}", flush=True)
    (l0, g0), (l1, g1) = res["torch ops grad"], res["triton grad"]
    rel = ((g1 - g0).norm() / g0.norm()).item()
    print(f"triton vs torch ops: loss {l1 - l0:+.3e} (of {l0:.2f}), gradient relative difference {rel:.2e}")
    # the kernel alone, one 4096-row chunk of logits: bytes moved = 3 x the logits
    logits = (h[:4096].detach() @ w.t()).contiguous()
    tc = t[:4096]
    gb = 3 * logits.numel() * logits.element_size() / 1e9
    for block, warps in ((2048, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 16)):
        ms = timed(lambda: softmax_grad_(logits, tc, block=block, num_warps=warps))
        print(f"kernel alone, block {block:5d}, {warps:2d} warps: {ms:6.3f} ms, {gb / ms:5.2f} TB/s", flush=True)
    ms = timed(lambda: torch.softmax(logits, -1, dtype=torch.float32).to(dt))
    print(f"for scale: torch softmax to fp32 then cast to bf16: {ms:6.3f} ms")


if __name__ == "__main__":
    main()
