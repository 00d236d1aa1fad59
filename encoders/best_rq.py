"""BEST-RQ self-supervised pre-training of the speech encoder (Chiu et al. 2022; Llama 3 8.1).

1. Span masking on fbank frames: each valid frame starts a masked span with probability p,
   span length L (Llama 3: p = 2.5 %, L = 32). Masked frames are replaced by noise.
2. Targets from the *unmasked* features: stack 4 frames (4 x 80 = 320 dims), project with a
   frozen random matrix to a small dim (16), L2-normalise, and take the nearest entry by
   cosine in each of C frozen random codebooks of V entries (Llama 3: C = 16, V = 8192).
3. Multi-softmax cross-entropy: one linear head per codebook on the encoder output, averaged
   over codebooks and over *masked* encoder frames only (a 40 ms frame counts as masked when
   any of its 4 fbank frames is).

Frozen parts are buffers derived from a seed: saved and restored with the state dict, never
trained.

Notation: b = batch, n = fbank frames, m = encoder frames (n / 4), f = fbank bins (80),
d = encoder width, c = codebooks, v = codebook entries, e = code dim, j = masked frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoders.speech import SpeechEncoder
from encoders.speech_features import num_stacked_frames, stack_frames


def span_mask(
    lengths: torch.Tensor, num_frames: int, *, prob: float, span: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random span mask over valid frames.

    Each valid frame starts a span of `span` frames with probability `prob`; spans are
    clipped to the row's length.

    Returns:
        (b, n) bool, True = masked; never True beyond `lengths`.
    """
    if not 0.0 <= prob <= 1.0 or span < 1:
        raise ValueError(f"need 0 <= prob <= 1 and span >= 1, got prob={prob}, span={span}")
    b = lengths.shape[0]
    valid = torch.arange(num_frames, device=lengths.device) < lengths[:, None]  # (b, n)
    u = torch.rand(b, num_frames, generator=generator, device="cpu").to(lengths.device)
    starts = (u < prob) & valid  # (b, n)
    return expand_spans(starts, span) & valid


def expand_spans(starts: torch.Tensor, span: int) -> torch.Tensor:
    """(b, n) bool span starts -> (b, n) bool: frame t is True if a span starts in (t - span, t]."""
    covered = F.max_pool1d(
        F.pad(starts.float()[:, None, :], (span - 1, 0)), kernel_size=span, stride=1
    )[:, 0]  # (b, n)
    return covered > 0


def stacked_mask(frame_mask: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """(b, n) fbank-frame mask -> (b, ceil(n / stride)) encoder-frame mask (any in group)."""
    b, n = frame_mask.shape
    m = -(-n // stride)
    padded = F.pad(frame_mask, (0, m * stride - n))
    return padded.view(b, m, stride).any(dim=-1)


class RandomProjectionQuantizer(nn.Module):
    """Frozen random-projection quantiser: stacked features -> codebook indices.

    forward(features (b, n, f), lengths (b,)) -> targets (b, m, c) long.
    Buffers: `projection` (stride * f, e), `codebooks` (c, v, e) with unit-norm rows.
    """

    def __init__(
        self, *, num_codebooks: int, codebook_size: int, code_dim: int = 16,
        in_dim: int = 80, stride: int = 4, seed: int = 0,
    ):
        super().__init__()
        self.stride, self.in_dim = stride, in_dim
        gen = torch.Generator().manual_seed(seed)
        projection = torch.empty(stride * in_dim, code_dim)
        bound = (6.0 / (stride * in_dim + code_dim)) ** 0.5  # Xavier uniform
        projection.uniform_(-bound, bound, generator=gen)
        codebooks = torch.randn(num_codebooks, codebook_size, code_dim, generator=gen)
        self.register_buffer("projection", projection)
        self.register_buffer("codebooks", F.normalize(codebooks, dim=-1))

    @property
    def num_codebooks(self) -> int:
        return self.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[1]

    @torch.no_grad()
    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        stacked = stack_frames(features.float(), lengths, self.stride)  # (b, m, stride * f)
        z = F.normalize(stacked @ self.projection, dim=-1)  # (b, m, e)
        # One codebook at a time keeps memory at b * m * v (Llama 3 size: v = 8192).
        codes = [(z @ book.T).argmax(dim=-1) for book in self.codebooks]  # c x (b, m)
        return torch.stack(codes, dim=-1)  # (b, m, c)


def multi_softmax_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy averaged over codebooks and the frames selected by `mask`.

    Args:
        logits: (..., c, v); targets: (..., c) long; mask: (...) bool, True = in the loss
            (None: all frames).

    Returns:
        loss (scalar) and accuracy (scalar, fraction of correct codes) over selected frames.
        With no selected frame the loss is 0 (still connected to the graph).
    """
    if mask is not None:
        logits, targets = logits[mask], targets[mask]  # (j, c, v), (j, c)
    if targets.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    v = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, v).float(), targets.reshape(-1))
    accuracy = (logits.argmax(dim=-1) == targets).float().mean()
    return loss, accuracy


@dataclass
class BestRqOutput:
    loss: torch.Tensor  # scalar
    accuracy: torch.Tensor  # scalar, on masked frames
    num_masked: int  # encoder frames in the loss
    frame_mask: torch.Tensor  # (b, n) bool, masked fbank frames
    target_mask: torch.Tensor  # (b, m) bool, encoder frames in the loss


class BestRq(nn.Module):
    """BEST-RQ objective around an injected `SpeechEncoder`.

    forward(features (b, n, f), lengths (b,), generator=None) -> BestRqOutput.
    Trainable: the encoder and `heads` (one Linear(d, v) per codebook, stored as one
    Linear(d, c * v)). Frozen: `quantizer` buffers.
    """

    def __init__(
        self, *, encoder: SpeechEncoder, quantizer: RandomProjectionQuantizer,
        mask_prob: float, mask_span: int, noise_std: float = 0.1,
    ):
        super().__init__()
        if quantizer.stride != encoder.stacker.stride or quantizer.in_dim != encoder.num_mel_bins:
            raise ValueError("quantizer stacking must match the encoder's FrameStacker")
        self.encoder, self.quantizer = encoder, quantizer
        self.mask_prob, self.mask_span, self.noise_std = mask_prob, mask_span, noise_std
        self.heads = nn.Linear(encoder.dim, quantizer.num_codebooks * quantizer.codebook_size)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> BestRqOutput:
        b, n, f = features.shape
        targets = self.quantizer(features, lengths)  # (b, m, c), from unmasked features
        frame_mask = span_mask(
            lengths, n, prob=self.mask_prob, span=self.mask_span, generator=generator
        )  # (b, n)
        noise = torch.randn(b, n, f, generator=generator).to(features) * self.noise_std
        masked = torch.where(frame_mask[..., None], noise, features)  # (b, n, f)
        hidden, valid = self.encoder(masked, lengths)  # (b, m, d), (b, m)
        target_mask = stacked_mask(frame_mask, self.quantizer.stride) & valid  # (b, m)
        selected = hidden[target_mask]  # (j, d)
        logits = self.heads(selected).view(
            -1, self.quantizer.num_codebooks, self.quantizer.codebook_size
        )  # (j, c, v)
        loss, accuracy = multi_softmax_loss(logits, targets[target_mask])
        return BestRqOutput(
            loss=loss, accuracy=accuracy, num_masked=int(target_mask.sum()),
            frame_mask=frame_mask, target_mask=target_mask,
        )


def best_rq(
    *, encoder: SpeechEncoder, num_codebooks: int, codebook_size: int, code_dim: int = 16,
    mask_prob: float, mask_span: int, noise_std: float = 0.1, seed: int = 0,
) -> BestRq:
    """BEST-RQ objective with a seed-derived frozen quantiser matched to `encoder`."""
    quantizer = RandomProjectionQuantizer(
        num_codebooks=num_codebooks, codebook_size=codebook_size, code_dim=code_dim,
        in_dim=encoder.num_mel_bins, stride=encoder.stacker.stride, seed=seed,
    )
    return BestRq(encoder=encoder, quantizer=quantizer, mask_prob=mask_prob,
                  mask_span=mask_span, noise_std=noise_std)


def best_rq_tiny(*, encoder: SpeechEncoder, seed: int = 0) -> BestRq:
    """CPU demo: 4 codebooks x 256 entries, p = 4 %, spans of 10 frames (~34 % masked)."""
    return best_rq(encoder=encoder, num_codebooks=4, codebook_size=256, mask_prob=0.04,
                   mask_span=10, seed=seed)


def best_rq_llama3(*, encoder: SpeechEncoder, seed: int = 0) -> BestRq:
    """Llama 3: 16 codebooks x 8192 entries, code dim 16, p = 2.5 %, spans of 32 frames."""
    return best_rq(encoder=encoder, num_codebooks=16, codebook_size=8192, mask_prob=0.025,
                   mask_span=32, seed=seed)
