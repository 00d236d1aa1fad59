"""A modality as the model sees it: an encoder and the adapter that brings it into the LLM.

Two ways in:
- ``"xattn"``: gated cross-attention layers before chosen decoder layers (image, video);
- ``"tokens"``: a projection whose outputs are used as token embeddings, between two
  trainable boundary embeddings (speech).

Notation: b=batch, m=media tokens, e=encoder width, d=LLM width.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("xattn", "tokens")


class Modality(nn.Module):
    """Encoder + adapter for one modality.

    Args:
        kind: ``"xattn"`` or ``"tokens"``.
        encoder: module with ``forward(inputs) -> (features (b, m, e), mask (b, m))``.
        xattn: for ``"xattn"``, decoder layer index -> cross-attention block.
        adapter: for ``"tokens"``, module ``(features, mask) -> (embeddings (b, m2, d), mask)``.
        llm_dim: LLM embedding width (for the boundary embeddings of ``"tokens"``).
    """

    def __init__(self, *, kind: str, encoder: nn.Module, xattn: dict[int, nn.Module] | None = None,
                 adapter: nn.Module | None = None, llm_dim: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown modality kind {kind!r}; choose one of {KINDS}")
        self.kind = kind
        self.encoder = encoder
        if kind == "xattn":
            if not xattn:
                raise ValueError("a cross-attention modality needs at least one adapter layer")
            self.xattn = nn.ModuleDict({str(i): m for i, m in sorted(xattn.items())})
        else:
            if adapter is None or llm_dim is None:
                raise ValueError("a token-embedding modality needs an adapter and llm_dim")
            self.adapter = adapter
            # begin / end of media: new embeddings, so no vocabulary row of the LLM changes.
            self.boundary = nn.Parameter(torch.randn(2, llm_dim) * 0.02)

    @property
    def layer_indices(self) -> list[int]:
        return [int(i) for i in self.xattn] if self.kind == "xattn" else []

    def encode(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(inputs, dict):
            return self.encoder(**inputs)
        return self.encoder(inputs)

    def embed(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings ``[begin, adapter(features)..., end]`` left-aligned, with mask."""
        emb, emask = self.adapter(feats, mask)  # (b, m2, d), (b, m2)
        b, m2, d = emb.shape
        out = emb.new_zeros(b, m2 + 2, d)
        lengths = emask.sum(-1)
        out[:, 0] = self.boundary[0]
        out[:, 1:m2 + 1] = emb * emask[..., None]
        out[torch.arange(b), lengths + 1] = self.boundary[1].to(out.dtype)
        omask = torch.arange(m2 + 2, device=emb.device)[None] < (lengths + 2)[:, None]
        return out, omask
