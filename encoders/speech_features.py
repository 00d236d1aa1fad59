"""Speech features: 80-dim log-mel filterbanks (25 ms window, 10 ms hop, 16 kHz) and the
stride-4 stacking layer that turns them into 40 ms frames.

Everything is batched with lengths and padding-safe: a sample's features and stacked frames
do not depend on the other samples in its batch.

Notation: b = batch, s = samples, n = fbank frames (10 ms), m = stacked frames (40 ms),
f = fbank bins (80), d = width.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import nn

SAMPLE_RATE = 16_000
NUM_MEL_BINS = 80
WIN_LENGTH = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms at 16 kHz
N_FFT = 512
LOG_FLOOR = 1e-6  # mel power floor before the log (digital silence stays finite)


@functools.lru_cache(maxsize=8)
def _analysis(num_mel_bins: int, sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hann window (WIN_LENGTH,) and mel filterbank (N_FFT // 2 + 1, f), float32 on CPU."""
    window = torch.hann_window(WIN_LENGTH)
    mel = AF.melscale_fbanks(
        n_freqs=N_FFT // 2 + 1,
        f_min=20.0,
        f_max=sample_rate / 2,
        n_mels=num_mel_bins,
        sample_rate=sample_rate,
        norm=None,
        mel_scale="htk",
    )
    return window, mel


def num_fbank_frames(num_samples: torch.Tensor | int) -> torch.Tensor | int:
    """Frames of a waveform of `num_samples` samples (no centring: 0 below one window)."""
    if isinstance(num_samples, torch.Tensor):
        return torch.where(
            num_samples >= WIN_LENGTH,
            torch.div(num_samples - WIN_LENGTH, HOP_LENGTH, rounding_mode="floor") + 1,
            torch.zeros_like(num_samples),
        )
    return 0 if num_samples < WIN_LENGTH else (num_samples - WIN_LENGTH) // HOP_LENGTH + 1


def pad_waveforms(waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D waveforms with zeros.

    Returns:
        waves (b, s) float32 and lengths (b,) long.
    """
    if not waveforms:
        raise ValueError("pad_waveforms needs at least one waveform")
    for i, w in enumerate(waveforms):
        if w.dim() != 1:
            raise ValueError(f"waveform {i} must be 1-D (samples,), got shape {tuple(w.shape)}")
    lengths = torch.tensor([w.shape[0] for w in waveforms], dtype=torch.long)
    waves = torch.nn.utils.rnn.pad_sequence(
        [w.float() for w in waveforms], batch_first=True
    )  # (b, s)
    return waves, lengths


def log_mel_fbank(
    waves: torch.Tensor,
    lengths: torch.Tensor,
    *,
    num_mel_bins: int = NUM_MEL_BINS,
    sample_rate: int = SAMPLE_RATE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural-log mel power spectrogram of padded waveforms (no centring, no dither).

    Args:
        waves: (b, s) float, padded; values in [-1, 1].
        lengths: (b,) valid samples per row.

    Returns:
        feats (b, n, f) float32, zero beyond each row's frames, and frame lengths (b,) long.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"fbank expects {SAMPLE_RATE} Hz audio, got {sample_rate} Hz; resample first")
    if waves.dim() != 2:
        raise ValueError(f"waves must be (b, s), got shape {tuple(waves.shape)}")
    if lengths.shape != waves.shape[:1] or bool((lengths > waves.shape[1]).any()):
        raise ValueError(f"lengths {lengths.tolist()} do not fit waves of shape {tuple(waves.shape)}")
    b = waves.shape[0]
    frame_lengths = num_fbank_frames(lengths.to(torch.long))  # (b,)
    n = int(frame_lengths.max().item()) if b else 0
    if n == 0:
        return waves.new_zeros(b, 0, num_mel_bins), frame_lengths
    window, mel = _analysis(num_mel_bins, sample_rate)
    waves = waves.float()[:, : (n - 1) * HOP_LENGTH + WIN_LENGTH]  # (b, s')
    frames = waves.unfold(1, WIN_LENGTH, HOP_LENGTH) * window.to(waves.device)  # (b, n, WIN_LENGTH)
    power = torch.fft.rfft(frames, n=N_FFT).abs().pow(2)  # (b, n, N_FFT // 2 + 1)
    feats = torch.log(power @ mel.to(waves.device) + LOG_FLOOR)  # (b, n, f)
    valid = torch.arange(n, device=waves.device) < frame_lengths.to(waves.device)[:, None]
    return feats * valid[..., None], frame_lengths


def normalize_features(
    feats: torch.Tensor, lengths: torch.Tensor, *, eps: float = 1e-5
) -> torch.Tensor:
    """Per-utterance mean/variance normalisation over valid frames (batch-independent).

    Args:
        feats: (b, n, f); lengths: (b,) valid frames.

    Returns:
        (b, n, f), zero mean and unit variance per bin over each row's valid frames, zero
        beyond them. Constant input (silence) becomes zeros.
    """
    valid = (torch.arange(feats.shape[1], device=feats.device) < lengths.to(feats.device)[:, None])
    valid = valid[..., None].to(feats.dtype)  # (b, n, 1)
    count = valid.sum(1, keepdim=True).clamp_min(1.0)  # (b, 1, 1)
    mean = (feats * valid).sum(1, keepdim=True) / count  # (b, 1, f)
    var = (((feats - mean) * valid) ** 2).sum(1, keepdim=True) / count  # (b, 1, f)
    return (feats - mean) / torch.sqrt(var + eps) * valid


def num_stacked_frames(lengths: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """Stacked frames for `lengths` input frames: ceil(lengths / stride)."""
    return torch.div(lengths + stride - 1, stride, rounding_mode="floor")


def stack_frames(x: torch.Tensor, lengths: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """Concatenate each run of `stride` frames; frames beyond `lengths` are zeroed first.

    Args:
        x: (b, n, f); lengths: (b,) valid frames.

    Returns:
        (b, ceil(n / stride), stride * f). A row's last, partial group is zero-padded, the
        same whether or not the row is batched with longer ones.
    """
    b, n, f = x.shape
    valid = torch.arange(n, device=x.device) < lengths.to(x.device)[:, None]  # (b, n)
    x = x * valid[..., None]
    m = math.ceil(n / stride)
    x = F.pad(x, (0, 0, 0, m * stride - n))  # (b, m * stride, f)
    return x.reshape(b, m, stride * f)


class FrameStacker(nn.Module):
    """Stride-4 stacking + Linear: 10 ms fbank frames -> 40 ms frames of width d.

    forward(x (b, n, f), lengths (b,)) -> (y (b, m, d), lengths (b,)), m = ceil(n / 4).
    Padded input frames never reach valid outputs; padded outputs are zero.
    """

    def __init__(self, *, in_dim: int = NUM_MEL_BINS, dim: int, stride: int = 4):
        super().__init__()
        self.in_dim, self.dim, self.stride = in_dim, dim, stride
        self.proj = nn.Linear(stride * in_dim, dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"FrameStacker expects (b, n, {self.in_dim}), got {tuple(x.shape)}")
        out_lengths = num_stacked_frames(lengths, self.stride)  # (b,)
        y = self.proj(stack_frames(x, lengths, self.stride))  # (b, m, d)
        valid = torch.arange(y.shape[1], device=y.device) < out_lengths.to(y.device)[:, None]
        return y * valid[..., None], out_lengths


def spec_augment(
    feats: torch.Tensor,
    lengths: torch.Tensor,
    generator: torch.Generator,
    *,
    freq_masks: int = 2,
    freq_width: int = 15,
    time_masks: int = 2,
    time_width: float = 0.05,
    warp: float = 0.0,
) -> torch.Tensor:
    """SpecAugment (Park et al., 2019) on normalised log-mel features, plus an optional
    warp of the mel axis (a vocal-tract-length change, as in VTLP: a speaker's formants move
    up or down together). Training-time only; a sample's result depends on its own row and
    the generator, so it is a function of (seed, step) as the data order is.

    Args:
        feats: (b, n, f) normalised (zero-mean) features; masked values become 0, the mean.
        lengths: (b,) valid frames.
        freq_masks / freq_width: masks of 0..freq_width consecutive mel bins per row.
        time_masks / time_width: masks of 0..time_width x the row's length frames per row.
        warp: each row's mel axis is stretched by a factor drawn from [1 - warp, 1 + warp]
            (linear interpolation between bins; 0: off).

    Returns:
        (b, n, f), a new tensor; frames beyond each row's length stay zero.
    """
    b, n, f = feats.shape
    out = feats.clone()
    if b == 0 or n == 0:
        return out
    if warp:
        scale = 1.0 + (torch.rand(b, generator=generator) * 2 - 1) * warp  # (b,)
        src = (torch.arange(f, dtype=torch.float32)[None, :] * scale[:, None]).clamp(0, f - 1)  # (b, f)
        lo = src.floor().long()
        w = (src - lo).to(out)[:, None]  # (b, 1, f): weight of the bin above
        lo = lo.to(out.device)[:, None].expand(b, n, f)
        hi = (lo + 1).clamp(max=f - 1)
        out = out.gather(2, lo) * (1 - w) + out.gather(2, hi) * w
    keep = torch.ones(b, n, f, dtype=torch.bool)
    bins = torch.arange(f)
    frames = torch.arange(n)
    for _ in range(freq_masks):
        width = torch.randint(freq_width + 1, (b,), generator=generator)
        start = (torch.rand(b, generator=generator) * (f - width + 1)).long()
        keep &= ~((bins[None] >= start[:, None]) & (bins[None] < (start + width)[:, None]))[:, None, :]
    lens = lengths.cpu().long()
    for _ in range(time_masks):
        width = (torch.rand(b, generator=generator) * (time_width * lens.float() + 1)).long()
        start = (torch.rand(b, generator=generator) * (lens - width + 1).clamp_min(1).float()).long()
        keep &= ~((frames[None] >= start[:, None]) & (frames[None] < (start + width)[:, None]))[:, :, None]
    valid = (frames[None] < lens[:, None])[:, :, None]
    return out * (keep & valid).to(out.device, out.dtype)
