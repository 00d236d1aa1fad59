"""Which CUDA SDPA kernel takes each masked attention call of the library, and what it costs.

For every case (the shapes and mask forms the image encoder's gated layers, the video
aggregator and the cross-attention adapters pass at the 1b-xattn bench sizes) it times one
forward+backward in bf16 with PyTorch's own choice, then with each backend forced alone
(``n/a`` when that backend refuses the inputs, with the first words of its reason). The
default's time next to the forced ones tells which kernel it picked. GPU only.

    python scripts/sdpa_paths.py            # prints the table (about 20 s on an H100/H200)
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def key_mask(b: int, m: int, valid: int, device) -> torch.Tensor:
    """(b, m) bool: the first ``valid`` keys of each row count."""
    return (torch.arange(m, device=device) < valid)[None].expand(b, m).contiguous()


def cases(device):
    """(name, q, k, v shapes as (b, h, t, c) / (b, kh, m, c), mask builder)."""
    bf = dict(device=device)
    out = []
    # image encoder, gated global layers: 8 images x 1601 tokens, 20 heads of 64
    m1 = key_mask(8, 1601, 1601, device)
    out.append(("gated, 1 tile, no mask", (8, 20, 1601, 64), (8, 20, 1601, 64), lambda: None))
    out.append(("gated, 1 tile, bool key mask (b,1,1,m)", (8, 20, 1601, 64), (8, 20, 1601, 64),
                lambda: m1[:, None, None, :]))
    out.append(("gated, 1 tile, float bias (b,1,1,m)", (8, 20, 1601, 64), (8, 20, 1601, 64),
                lambda: torch.zeros(8, 1, 1, 1601, dtype=torch.bfloat16, **bf).masked_fill(~m1[:, None, None, :],
                                                                                            float("-inf"))))
    # the key mask as the encoder built it before change 8: one tile's mask expanded over its
    # tokens, a view whose last dimension has stride 0
    m0 = torch.ones(8, 1, dtype=torch.bool, device=device)[:, :, None].expand(8, 1, 1601).reshape(8, 1601)
    out.append(("gated, 1 tile, bool key mask, stride-0 keys", (8, 20, 1601, 64), (8, 20, 1601, 64),
                lambda: m0[:, None, None, :]))
    out.append(("gated, 1 tile, the same mask made contiguous", (8, 20, 1601, 64), (8, 20, 1601, 64),
                lambda: m0[:, None, None, :].contiguous()))
    m2 = key_mask(4, 3202, 2 * 1601 - 1601 // 2, device)  # 2 tiles, second half padded
    out.append(("gated, 2 tiles padded, bool key mask", (4, 20, 3202, 64), (4, 20, 3202, 64),
                lambda: m2[:, None, None, :]))
    out.append(("gated, 2 tiles padded, float bias (b,1,1,m)", (4, 20, 3202, 64), (4, 20, 3202, 64),
                lambda: torch.zeros(4, 1, 1, 3202, dtype=torch.bfloat16, **bf).masked_fill(~m2[:, None, None, :],
                                                                                            float("-inf"))))
    out.append(("gated, 2 tiles padded, float bias (b,h,m,m) expanded",
                (4, 20, 3202, 64), (4, 20, 3202, 64),
                lambda: torch.zeros(4, 1, 1, 3202, dtype=torch.bfloat16, **bf).masked_fill(
                    ~m2[:, None, None, :], float("-inf")).expand(4, 20, 3202, 3202)))
    # video aggregator: 64 latents attend to 8 frames x 257 tokens + the latents
    mv = key_mask(8, 8 * 257 + 64, 6 * 257, device) | (torch.arange(8 * 257 + 64, device=device) >= 8 * 257)
    out.append(("video aggregator, bool key mask", (8, 16, 64, 64), (8, 16, 8 * 257 + 64, 64),
                lambda: mv[:, None, None, :]))
    # cross-attention adapter: GQA folded (8 kv heads x 4 query heads x 1024 rows), 1601 media
    # tokens per image; two images per sample -> a (b, 1, rep*t, m) row/column mask
    t, m = 1024, 2 * 1601
    rows = torch.arange(t, device=device)[:, None] >= 512
    cols = torch.arange(m, device=device)[None, :] < 1601
    mx = rows | cols  # text before position 512 sees image 1, after it both
    mx = mx[None, None].expand(8, 1, t, m)
    out.append(("cross-attn, 2 images, bool mask (b,1,rep*t,m)", (8, 8, 4 * t, 64), (8, 8, m, 64),
                lambda: mx[:, :, None].expand(8, 1, 4, t, m).reshape(8, 1, 4 * t, m)))
    out.append(("cross-attn, 2 images, float bias (b,1,rep*t,m)", (8, 8, 4 * t, 64), (8, 8, m, 64),
                lambda: torch.zeros(8, 1, 4 * t, m, dtype=torch.bfloat16, **bf).masked_fill(
                    ~mx[:, :, None].expand(8, 1, 4, t, m).reshape(8, 1, 4 * t, m), float("-inf"))))
    return out


def time_call(fn, reps: int = 5) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; forward+backward, bf16, ms (median of 5)")
    print(f"{'case':52s} {'default':>8s} " + " ".join(f"{n:>10s}" for n in BACKENDS))
    for name, qs, ks, mask_fn in cases(device):
        q = torch.randn(*qs, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(*ks, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(*ks, device=device, dtype=torch.bfloat16, requires_grad=True)
        mask = mask_fn()

        def call():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

        cells = [f"{time_call(call):8.2f}"]
        reasons = []
        for bname, backend in BACKENDS.items():
            with warnings.catch_warnings(record=True) as w, sdpa_kernel([backend]):
                warnings.simplefilter("always")
                try:
                    cells.append(f"{time_call(call):10.2f}")
                except RuntimeError:
                    why = " ".join(str(w[0].message).split()[:14]) if w else "refused"
                    cells.append(f"{'n/a':>10s}")
                    reasons.append(f"{bname}: {why}")
        print(f"{name:52s} " + " ".join(cells))
        for r in reasons:
            print(f"    {r}")
        del q, k, v, mask
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
