"""Video encoder: frames -> image encoder -> perceiver resampler over runs of K frames.

Notation: b = batch, f = frames, n = tokens per frame, K = frames per group, g = groups
(ceil(f / K)), m = latent tokens per group (n in the Llama 3 recipe), d = width.

Llama 3 (section 7.2): up to 64 frames, each through the image encoder; a temporal aggregator
(a perceiver resampler) merges each run of K consecutive frames into one, K = 16 in
pre-training and 32 in fine-tuning. The encoder knows nothing about the language model.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from encoders.frozen import fixed

__all__ = [
    "FRAMES_PER_GROUP",
    "PerceiverLayer",
    "PerceiverResampler",
    "VideoEncoder",
    "video_aggregator",
    "video_aggregator_tiny",
    "video_encoder",
]

FRAMES_PER_GROUP = {"pretrain": 16, "finetune": 32}  # Llama 3: 16 -> 1, then 32 -> 1


class PerceiverLayer(nn.Module):
    """Latents attend to [media tokens; latents], then a feed-forward block (pre-LayerNorm).

    latents (B, m, d), media (B, L, d), media_mask (B, L) bool (True = real) -> (B, m, d).
    """

    def __init__(self, *, dim: int, num_heads: int, ffn_mult: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim)
        )

    def forward(
        self, latents: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor
    ) -> torch.Tensor:
        B, m, d = latents.shape
        h = self.num_heads
        q_in = self.norm_latents(latents)  # (B, m, d)
        kv_in = torch.cat([self.norm_media(media), q_in], dim=1)  # (B, L + m, d)
        kv_mask = torch.cat([media_mask, media_mask.new_ones(B, m)], dim=1)  # (B, L + m)
        q = self.to_q(q_in).view(B, m, h, d // h).transpose(1, 2)  # (B, h, m, d/h)
        kv = self.to_kv(kv_in).view(B, -1, 2, h, d // h)  # (B, L+m, 2, h, d/h)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, h, L+m, d/h)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_mask[:, None, None, :])
        latents = latents + self.to_out(attn.transpose(1, 2).reshape(B, m, d))  # (B, m, d)
        return latents + self.ffn(self.norm_ffn(latents))  # (B, m, d)


class PerceiverResampler(nn.Module):
    """Temporal aggregator: each run of K consecutive frames -> one group of m latent tokens.

    forward(x (b, f, n, d), frame_mask (b, f) bool | None) -> (tokens (b, g*m, d), mask (b, g*m))

    f is padded up to a multiple of K with masked frames. Each frame's tokens get a learned
    embedding of the frame's position within its run; a learned set of m latents per group
    cross-attends to that group's K*n frame tokens (and to itself) through `depth` layers,
    then a final LayerNorm. Groups never see each other, masked frames are zeroed and hidden
    from attention, and a group with no valid frame gives masked (zero) tokens.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_latents: int,
        frames_per_group: int,
        depth: int,
        num_heads: int,
        ffn_mult: int = 4,
    ):
        super().__init__()
        if frames_per_group < 1 or num_latents < 1 or depth < 1:
            raise ValueError(
                "frames_per_group, num_latents and depth must be >= 1, got "
                f"{frames_per_group}, {num_latents}, {depth}"
            )
        self.frames_per_group = frames_per_group
        self.num_latents = num_latents
        self.frame_pos = nn.Parameter(torch.randn(frames_per_group, dim) * 0.02)  # (K, d)
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)  # (m, d)
        self.layers = nn.ModuleList(
            PerceiverLayer(dim=dim, num_heads=num_heads, ffn_mult=ffn_mult) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, f, n, d = x.shape
        K, m = self.frames_per_group, self.num_latents
        g = max(1, math.ceil(f / K))
        if frame_mask is None:
            frame_mask = torch.ones(b, f, dtype=torch.bool, device=x.device)
        frame_mask = frame_mask.to(torch.bool)  # (b, f)
        if frame_mask.shape != (b, f):
            raise ValueError(f"frame_mask shape {tuple(frame_mask.shape)} != (b, f) = {(b, f)}")

        pad = g * K - f
        x = x.masked_fill(~frame_mask[:, :, None, None], 0.0)  # (b, f, n, d)
        x = F.pad(x, (0, 0, 0, 0, 0, pad))  # (b, g*K, n, d)
        frame_mask = F.pad(frame_mask, (0, pad), value=False)  # (b, g*K)

        x = x.view(b, g, K, n, d) + self.frame_pos[:, None, :].to(x.dtype)  # (b, g, K, n, d)
        media = x.reshape(b * g, K * n, d)  # (b*g, K*n, d)
        media_mask = frame_mask.view(b * g, K, 1).expand(-1, -1, n).reshape(b * g, K * n)

        latents = self.latents.to(x.dtype).expand(b * g, m, d)  # (b*g, m, d)
        for layer in self.layers:
            latents = layer(latents, media, media_mask)  # (b*g, m, d)
        latents = self.norm(latents)

        group_mask = frame_mask.view(b, g, K).any(dim=-1)  # (b, g)
        token_mask = group_mask[:, :, None].expand(-1, -1, m).reshape(b, g * m)  # (b, g*m)
        tokens = latents.reshape(b, g * m, d) * token_mask[:, :, None].to(latents.dtype)
        return tokens, token_mask  # (b, g*m, d), (b, g*m)


class VideoEncoder(nn.Module):
    """Frames -> injected image encoder (one batched call) -> temporal aggregator.

    forward(frames (b, f, 3, H, W) float, frame_mask (b, f) bool | None)
        -> (features (b, g*m, d), mask (b, g*m))

    image_encoder: any module mapping pixels (N, 3, H, W) -> (N, n, d). It runs once per
        forward on the valid frames of the whole batch (padding frames are not encoded).
    freeze_image_encoder: its parameters stop requiring grad, it runs under no_grad and
        stays in eval mode when `.train()` is called.
    """

    def __init__(
        self, image_encoder: nn.Module, aggregator: nn.Module, *, freeze_image_encoder: bool = False
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.aggregator = aggregator
        self.freeze_image_encoder = freeze_image_encoder
        if freeze_image_encoder:
            self.image_encoder.requires_grad_(False)
            self.image_encoder.eval()

    def train(self, mode: bool = True) -> "VideoEncoder":
        super().train(mode)
        if self.freeze_image_encoder:
            self.image_encoder.eval()
        return self

    def forward(
        self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None, **inputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.trunk(frames, frame_mask, **inputs), frames, frame_mask)

    # -- the parts, for a feature cache (mm.modality.FeatureCache) -------------------------
    def cache_cut(self) -> str | None:
        """``"frames"`` when the image encoder is fixed in this stage (its per-frame features
        are then a function of the clip alone), else None."""
        return "frames" if fixed(self.image_encoder) else None

    def trunk(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None, *,
              cut: str = "frames", **_) -> torch.Tensor:
        """Per-frame image features (b, f, n, d); padding frames are zeros, not encoded."""
        pixels = frames.flatten(0, 1)  # (b*f, 3, H, W)
        return self._per_frame(frames, frame_mask, lambda keep: self.image_encoder(pixels[keep]))

    def _per_frame(self, frames: torch.Tensor, frame_mask: torch.Tensor | None, encode) -> torch.Tensor:
        """``encode(keep)`` -> (N, n, d) features of the valid frames ``keep`` (indices into
        the b*f frames), under no_grad when the image encoder is frozen, scattered into
        (b, f, n, d) with zeros for padding frames."""
        b, f = frames.shape[:2]
        keep = self._frame_mask(frames, frame_mask).flatten().nonzero().squeeze(1)  # (N,)
        if keep.numel() == 0:
            keep = keep.new_zeros(1)  # encode one frame only to learn (n, d); it stays masked
        grad = torch.no_grad() if self.freeze_image_encoder else contextlib.nullcontext()
        with grad:
            feats = encode(keep)  # (N, n, d)
        n, d = feats.shape[1:]
        return feats.new_zeros(b * f, n, d).index_copy(0, keep, feats).view(b, f, n, d)

    def head(self, trunk: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor | None = None, *,
             cut: str = "frames", **_) -> tuple[torch.Tensor, torch.Tensor]:
        """The temporal aggregator on :meth:`trunk`'s output: (b, g*m, d), (b, g*m)."""
        return self.aggregator(trunk, self._frame_mask(frames, frame_mask))

    @staticmethod
    def _frame_mask(frames: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        if frame_mask is None:
            return torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
        return frame_mask.to(torch.bool)  # (b, f)


def video_aggregator(
    *,
    dim: int,
    num_latents: int,
    frames_per_group: int = FRAMES_PER_GROUP["pretrain"],
    depth: int = 2,
    num_heads: int = 8,
    ffn_mult: int = 4,
) -> PerceiverResampler:
    """Perceiver resampler; use FRAMES_PER_GROUP["pretrain"] (16) or ["finetune"] (32) for K."""
    return PerceiverResampler(
        dim=dim,
        num_latents=num_latents,
        frames_per_group=frames_per_group,
        depth=depth,
        num_heads=num_heads,
        ffn_mult=ffn_mult,
    )


def video_aggregator_tiny(
    *, dim: int = 32, num_latents: int = 4, frames_per_group: int = 4
) -> PerceiverResampler:
    """A two-layer, two-head aggregator for tests and the CPU demo."""
    return video_aggregator(
        dim=dim,
        num_latents=num_latents,
        frames_per_group=frames_per_group,
        depth=2,
        num_heads=2,
        ffn_mult=2,
    )


def video_encoder(
    *, image_encoder: nn.Module, aggregator: nn.Module, freeze_image_encoder: bool = False
) -> VideoEncoder:
    """Compose an image encoder (pixels (N, 3, H, W) -> (N, n, d)) with a temporal aggregator."""
    return VideoEncoder(image_encoder, aggregator, freeze_image_encoder=freeze_image_encoder)
