"""Gated cross-attention: LLM token states (queries) attend to media features (keys/values).

Notation: b=batch, t=text tokens, m=media tokens, d=LLM width, e=media feature width,
h=query heads, k=key/value heads, c=head width.

The layer is a residual block with two branches, attention and MLP, each scaled by
``tanh(gate)`` with the gate initialised to zero, so at initialisation the block is the
identity and the LLM behaves exactly as the text model. A text position with no media
before it receives neither branch (both are multiplied by a 0/1 row mask), which is what
Meta's reference does; masking only the MLP lets attention over an all-masked row leak.
Keys and values depend only on the media, so :meth:`project_kv` is called once per media
and the result is reused at every decoding step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedCrossAttention", "cross_attention_tiny"]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, linear=None) -> torch.Tensor:
        lin = _call if linear is None else linear
        return lin(self.down_proj, F.silu(lin(self.gate_proj, x)) * lin(self.up_proj, x))


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class GatedCrossAttention(nn.Module):
    """One gated cross-attention block (GQA, RMSNorm on q and k, no rotary on keys).

    Args:
        dim: LLM hidden width d.
        media_dim: media feature width e.
        n_heads, n_kv_heads: query and key/value heads (GQA when fewer kv heads).
        head_dim: per-head width c (default ``dim // n_heads``).
        ffn_dim: hidden width of the gated SwiGLU MLP.
        norm_eps: RMSNorm epsilon.
    """

    def __init__(self, *, dim: int, media_dim: int, n_heads: int, n_kv_heads: int,
                 head_dim: int | None = None, ffn_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        c = head_dim or dim // n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, c
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.q_proj = nn.Linear(dim, n_heads * c, bias=False)
        self.k_proj = nn.Linear(media_dim, n_kv_heads * c, bias=False)
        self.v_proj = nn.Linear(media_dim, n_kv_heads * c, bias=False)
        self.q_norm = nn.RMSNorm(c, eps=norm_eps)
        self.k_norm = nn.RMSNorm(c, eps=norm_eps)
        self.o_proj = nn.Linear(n_heads * c, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, ffn_dim)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def project_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the media, computed once per media.

        Args:
            media: (b, m, e) features.
        Returns:
            k, v: (b, k, m, c) each (k already RMS-normalised).
        """
        b, m, _ = media.shape
        k = self.k_proj(media).view(b, m, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(media).view(b, m, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return self.k_norm(k), v  # (b, k, m, c) x2

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor, linear=None) -> torch.Tensor:
        """Args:
            x: (b, t, d) LLM token states.
            kv: output of :meth:`project_kv`.
            mask: (b, t, m) bool, True where text position t may see media token m; or
                (b, t, 1) bool when a position sees either all media tokens or none (then no
                key mask is needed and attention runs unmasked, as fast as it can).
            linear: ``linear(module, x)`` runs each projection (default ``module(x)``); the
                CPU decoder passes its faster product order for a few rows.
        Returns:
            (b, t, d) updated token states.
        """
        k, v = kv
        b, t, _ = x.shape
        if mask.shape[-1] == 1:
            attn_mask, row = None, mask.to(x.dtype)  # (b, t, 1)
        else:
            has_media = mask.any(dim=-1)  # (b, t)
            # A row with nothing to attend to would give NaN in softmax: let it attend to
            # everything, then drop its output with the row mask below.
            attn_mask = (mask | ~has_media[..., None])[:, None]  # (b, 1, t, m)
            row = has_media[..., None].to(x.dtype)  # (b, t, 1)

        lin = _call if linear is None else linear
        q = lin(self.q_proj, self.attn_norm(x)).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q = self.q_norm(q)  # (b, h, t, c)
        a = self.attend(q, k, v, attn_mask)  # (b, t, h * c)
        a = lin(self.o_proj, a)  # (b, t, d)
        x = x + self.attn_gate.tanh() * a * row
        x = x + self.mlp_gate.tanh() * self.mlp(self.mlp_norm(x), linear) * row
        return x

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Grouped-query attention without copying keys/values per query head: the query
        heads sharing a key/value head are folded into the query length.

        Args:
            q: (b, h, t, c); k, v: (b, k, m, c); attn_mask: (b, 1, t, m) bool or None.
        Returns:
            (b, t, h * c).
        """
        b, h, t, c = q.shape
        kh = k.shape[1]
        rep = h // kh
        if rep == 1:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (b, h, t, c)
            return a.transpose(1, 2).reshape(b, t, h * c)
        qg = q.reshape(b, kh, rep * t, c)  # query head g*rep+r -> group g, rows r*t..r*t+t-1
        if attn_mask is not None:
            m = attn_mask.shape[-1]
            attn_mask = attn_mask[:, :, None].expand(b, 1, rep, t, m).reshape(b, 1, rep * t, m)
        a = F.scaled_dot_product_attention(qg, k, v, attn_mask=attn_mask)  # (b, k, rep*t, c)
        return a.reshape(b, h, t, c).transpose(1, 2).reshape(b, t, h * c)


def cross_attention_tiny(*, dim: int = 64, media_dim: int = 32) -> GatedCrossAttention:
    """A small block for tests."""
    return GatedCrossAttention(dim=dim, media_dim=media_dim, n_heads=4, n_kv_heads=2, ffn_dim=2 * dim)
