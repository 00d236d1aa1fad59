"""Speech encoder (Llama 3 recipe): 80-dim log-mel at 10 ms -> stride-4 stacking + Linear
(40 ms frames) -> rotary Conformer.

The encoder knows nothing about the LLM; `adapters.speech` maps its output to LLM embeddings.
Batched output equals unbatched output for every sample (padding never leaks).

Notation: b = batch, s = samples, n = fbank frames (10 ms), m = encoder frames (40 ms),
f = fbank bins (80), d = width.
"""

from __future__ import annotations

import torch
from torch import nn

from encoders.conformer import Conformer, conformer
from encoders.speech_features import (
    NUM_MEL_BINS,
    SAMPLE_RATE,
    FrameStacker,
    log_mel_fbank,
    normalize_features,
    pad_waveforms,
)


class SpeechEncoder(nn.Module):
    """Features -> FrameStacker -> Conformer.

    forward(features (b, n, f), lengths (b,)) -> (out (b, m, d), mask (b, m) bool, True = valid),
    m = ceil(n / 4); `out` is zero at padded frames.
    """

    sample_rate = SAMPLE_RATE
    frame_seconds = 0.04  # one output frame

    def __init__(self, *, stacker: FrameStacker, conformer: Conformer):
        super().__init__()
        self.stacker = stacker
        self.conformer = conformer
        self.dim = stacker.dim
        self.num_mel_bins = stacker.in_dim

    def featurize(self, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad 16 kHz mono waveforms and compute normalised log-mel features.

        Args:
            waveforms: list of (s_i,) float tensors, 16 kHz, values in [-1, 1].

        Returns:
            feats (b, n, f) float32 and lengths (b,) long (fbank frames; 0 below 25 ms).
        """
        waves, sample_lengths = pad_waveforms(waveforms)  # (b, s), (b,)
        feats, lengths = log_mel_fbank(waves, sample_lengths, num_mel_bins=self.num_mel_bins)
        return normalize_features(feats, lengths), lengths  # (b, n, f), (b,)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if features.dim() != 3 or features.shape[-1] != self.num_mel_bins:
            raise ValueError(
                f"SpeechEncoder expects features (b, n, {self.num_mel_bins}), got {tuple(features.shape)}"
            )
        if lengths.shape != features.shape[:1]:
            raise ValueError(f"lengths must be ({features.shape[0]},), got {tuple(lengths.shape)}")
        x, out_lengths = self.stacker(features, lengths)  # (b, m, d), (b,)
        mask = torch.arange(x.shape[1], device=x.device) < out_lengths.to(x.device)[:, None]  # (b, m)
        return self.conformer(x, mask), mask  # (b, m, d), (b, m)

    def encode_waveforms(self, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """featurize + forward: list of (s_i,) -> (out (b, m, d), mask (b, m))."""
        feats, lengths = self.featurize(waveforms)
        device = next(self.parameters()).device
        return self(feats.to(device), lengths.to(device))


def speech_encoder(
    *, dim: int, num_layers: int, num_heads: int, ffn_dim: int, kernel_size: int,
    num_mel_bins: int = NUM_MEL_BINS, stride: int = 4, dropout: float = 0.0,
    activation_checkpointing: bool = False, branch_init: float = 1.0,
) -> SpeechEncoder:
    """Build a speech encoder from sizes (`branch_init`: see `encoders.conformer.conformer`)."""
    return SpeechEncoder(
        stacker=FrameStacker(in_dim=num_mel_bins, dim=dim, stride=stride),
        conformer=conformer(
            dim=dim, num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim,
            kernel_size=kernel_size, dropout=dropout,
            activation_checkpointing=activation_checkpointing, branch_init=branch_init,
        ),
    )


def speech_encoder_tiny(*, dropout: float = 0.0, branch_init: float = 1.0) -> SpeechEncoder:
    """CPU demo size: d=144, 4 layers, 4 heads, FFN 576, conv kernel 15 (1.98M parameters)."""
    return speech_encoder(dim=144, num_layers=4, num_heads=4, ffn_dim=576, kernel_size=15, dropout=dropout,
                          branch_init=branch_init)


def speech_encoder_llama3(*, dropout: float = 0.1, activation_checkpointing: bool = False,
                          branch_init: float = 1.0) -> SpeechEncoder:
    """Llama 3 speech encoder (1.00B parameters): d=1536, 24 layers, 24 heads, Macaron FFN
    4096, conv kernel 7. Forward + backward on ~1 s of audio peaks at ~8.3 GiB RSS on CPU
    (fp32 weights + gradients); AdamW states add another 8 GB."""
    return speech_encoder(
        dim=1536, num_layers=24, num_heads=24, ffn_dim=4096, kernel_size=7, dropout=dropout,
        activation_checkpointing=activation_checkpointing, branch_init=branch_init,
    )
