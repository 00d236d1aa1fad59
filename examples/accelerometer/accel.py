"""A new modality in one file: 3-axis accelerometer recordings.

Nothing in the library changes to add it. This file declares:
- the encoder (a small 1-D convolution stack returning ``[batch, tokens, dim]`` + a mask),
- how it enters the LLM (token embeddings, through the library's projection adapter),
- how one raw input is read (``.npy`` or ``.csv``) and preprocessed, and batched,
- the default prompt, and a built-in synthetic data source.

A YAML refers to it as ``type: examples.accelerometer.accel:ACCEL``.

Notation: b=batch, s=samples (50 Hz), m=encoder frames, d=width.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mm.modalities import ModalityType, token_count, token_modality

STRIDE = 4          # the encoder's total downsampling: 50 Hz -> 12.5 frames/s
MAX_SECONDS = 20.0


class AccelEncoder(nn.Module):
    """(b, s, 3) accelerations + lengths -> (b, m, d) features + (b, m) mask.

    The device may be held any way round, so the convolutions see orientation-invariant
    channels, not raw axes: the magnitude of the acceleration minus 1 g, and the motion along
    and across gravity (gravity estimated as the recording's mean acceleration).
    """

    def __init__(self, *, dim: int = 64, hidden: int = 32):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(
            nn.Conv1d(3, hidden, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(hidden, dim, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(dim, dim, 3, padding=1))

    @staticmethod
    def invariant(signal: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(b, s, 3) accelerations, (b, s) valid -> (b, s, 3) rotation-invariant channels."""
        n = keep.sum(1, keepdim=True).clamp(min=1)[..., None]  # (b, 1, 1)
        g = (signal * keep[..., None]).sum(1, keepdim=True) / n  # (b, 1, 3) mean: gravity
        up = g / g.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        motion = signal - g
        vertical = (motion * up).sum(-1, keepdim=True)  # (b, s, 1)
        across = (motion - vertical * up).norm(dim=-1, keepdim=True)
        return torch.cat([signal.norm(dim=-1, keepdim=True) - 1.0, vertical, across], dim=-1) * keep[..., None]

    def forward(self, signal: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = signal.shape[1]
        keep = (torch.arange(s, device=signal.device)[None] < lengths[:, None]).to(signal.dtype)
        x = self.invariant(signal, keep).transpose(1, 2)  # (b, 3, s)
        x = self.net(x).transpose(1, 2)  # (b, m, d)
        m = (lengths + STRIDE - 1) // STRIDE
        mask = torch.arange(x.shape[1], device=x.device)[None] < m[:, None]
        return x * mask[..., None], mask


def build(llm, *, encoder: dict | None = None, adapter: dict | None = None):
    enc = AccelEncoder(**(encoder or {}))
    return token_modality(llm, enc, enc_dim=enc.dim, **(adapter or {}))


def read(path: Path) -> np.ndarray:
    """``.npy`` (samples, 3) or ``.csv`` with a header row; one-line errors naming the file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif path.suffix == ".csv":
            x = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        else:
            raise ValueError(f"unsupported format {path.suffix!r} (use .npy or .csv)")
    except ValueError as e:
        raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"{path}: expected (samples, 3) accelerations, got shape {x.shape}")
    if len(x) < STRIDE:
        raise ValueError(f"{path}: too short ({len(x)} samples)")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: contains NaN or infinite values")
    return x.astype(np.float32)


def preprocess(x: np.ndarray, modality, *, max_seconds: float = MAX_SECONDS) -> dict:
    x = torch.from_numpy(x[: int(max_seconds * 50)])
    return {"signal": x, "lengths": torch.tensor(len(x))}


def collate(items: list[dict]) -> dict:
    n = max(int(it["lengths"]) for it in items)
    sig = torch.zeros(len(items), n, 3)
    for i, it in enumerate(items):
        sig[i, : len(it["signal"])] = it["signal"]
    return {"signal": sig, "lengths": torch.stack([it["lengths"] for it in items])}


def num_tokens(item: dict, modality) -> int:
    frames = (int(item["lengths"]) + STRIDE - 1) // STRIDE
    return token_count(frames, kernel_size=modality.adapter.conv.kernel_size[0], stride=modality.adapter.conv.stride[0])


def synthetic(*, out: str, n: int, seed: int = 0, split: str = "train", fmt: str = "npy") -> list[dict]:
    """Built-in source: write synthetic recordings under ``out`` and return their records."""
    from examples.accelerometer.synth import make_dataset
    from mm.data import read_manifest
    return read_manifest(make_dataset(out, n=n, seed=seed, split=split, fmt=fmt))


ACCEL = ModalityType(
    name="accel", kind="tokens", build=build, read=read, preprocess=preprocess, collate=collate,
    empty=lambda it: {"signal": torch.zeros_like(it["signal"]), "lengths": torch.tensor(STRIDE)},
    num_tokens=num_tokens, suffixes=(".npy", ".csv"), prompt="What is the person doing?",
    sources={"accel-synthetic": synthetic},
)
