"""Speech adapter (Llama 3 recipe, ~100M at full size): speech-encoder frames -> LLM token
embeddings.

    Conv1d (kernel 3, stride 2: 40 ms -> 80 ms frames) -> one rotary Transformer layer
    -> LayerNorm -> Linear to the LLM embedding width.

The outputs are fed to the LLM as token embeddings (no cross-attention). The adapter is
mask-aware: padded input frames are zeroed before the convolution and masked as attention
keys, so a sample's output does not depend on the rest of its batch. It knows nothing about a
particular LLM beyond its embedding width.

Notation: b = batch, m = encoder frames (40 ms), m2 = adapter frames (80 ms, ceil(m / 2)),
d_enc = encoder width, d = adapter width, d_llm = LLM embedding width.
"""

from __future__ import annotations

import torch
from torch import nn

from encoders.conformer import FeedForward, RotarySelfAttention


class TransformerLayer(nn.Module):
    """Pre-norm Transformer layer with rotary self-attention.

    forward(x (b, m, d), mask (b, m) bool, True = valid) -> (b, m, d).
    """

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = RotarySelfAttention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.ffn = FeedForward(dim=dim, hidden_dim=ffn_dim, dropout=dropout)  # norm inside

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), mask))  # (b, m, d)
        return x + self.ffn(x)  # (b, m, d)


class SpeechAdapter(nn.Module):
    """Conv1d downsampling -> rotary Transformer layer -> projection to the LLM width.

    forward(x (b, m, d_enc), mask (b, m) bool) -> (emb (b, m2, d_llm), mask2 (b, m2) bool);
    `mask` is True on each row's valid frames, which come first (right padding, as the speech
    encoder returns); `emb` is zero at padded positions.
    """

    def __init__(
        self, *, encoder_dim: int, dim: int, llm_dim: int, num_heads: int, ffn_dim: int,
        kernel_size: int = 3, stride: int = 2, dropout: float = 0.0,
    ):
        super().__init__()
        self.encoder_dim, self.dim, self.llm_dim = encoder_dim, dim, llm_dim
        self.kernel_size, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        self.conv = nn.Conv1d(encoder_dim, dim, kernel_size, stride=stride, padding=self.padding)
        self.layer = TransformerLayer(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, llm_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames for `lengths` valid input frames (ceil(m / 2) for k=3, s=2)."""
        out = torch.div(lengths + 2 * self.padding - self.kernel_size, self.stride,
                        rounding_mode="floor") + 1
        return torch.where(lengths > 0, out.clamp_min(0), torch.zeros_like(lengths))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.encoder_dim:
            raise ValueError(f"SpeechAdapter expects (b, m, {self.encoder_dim}), got {tuple(x.shape)}")
        if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
            raise ValueError(f"mask must be bool {tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
        x = x * mask[..., None]  # padding must not leak through the conv
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (b, m2, d)
        lengths2 = self.output_lengths(mask.sum(dim=1))  # (b,)
        mask2 = torch.arange(y.shape[1], device=y.device) < lengths2[:, None]  # (b, m2)
        y = self.layer(y, mask2)  # (b, m2, d)
        emb = self.proj(self.norm(y))  # (b, m2, d_llm)
        return emb * mask2[..., None], mask2


def speech_adapter(
    *, encoder_dim: int, dim: int, llm_dim: int, num_heads: int, ffn_dim: int,
    kernel_size: int = 3, stride: int = 2, dropout: float = 0.0,
) -> SpeechAdapter:
    """Build a speech adapter from sizes."""
    return SpeechAdapter(encoder_dim=encoder_dim, dim=dim, llm_dim=llm_dim, num_heads=num_heads,
                         ffn_dim=ffn_dim, kernel_size=kernel_size, stride=stride, dropout=dropout)


def speech_adapter_tiny(*, llm_dim: int, encoder_dim: int = 144, dropout: float = 0.0) -> SpeechAdapter:
    """CPU demo size: width 192, 4 heads, FFN 512 on d_enc=144 (0.54M parameters at d_llm=576)."""
    return speech_adapter(encoder_dim=encoder_dim, dim=192, llm_dim=llm_dim, num_heads=4,
                          ffn_dim=512, dropout=dropout)


def speech_adapter_llama3(*, llm_dim: int, encoder_dim: int = 1536, dropout: float = 0.1) -> SpeechAdapter:
    """Llama 3 size: width 3072, 24 heads, FFN 4096 on d_enc=1536 (89.7M parameters at d_llm=4096)."""
    return speech_adapter(encoder_dim=encoder_dim, dim=3072, llm_dim=llm_dim, num_heads=24,
                          ffn_dim=4096, dropout=dropout)
