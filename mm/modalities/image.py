"""The image modality: tiled open_clip ViT features through gated cross-attention."""

from __future__ import annotations

import torch

from adapters.cross_attention import GatedCrossAttention
from encoders.image import image_encoder
from encoders.image_io import load_image, possible_grids, tile_image
from mm.modality import Modality
from mm.modalities.base import LLMShape, ModalityType, xattn_layers


def build_xattn(llm: LLMShape, media_dim: int, *, every: int = 4, first: int | None = None,
                layers: list[int] | None = None, heads: int | None = None, kv_heads: int | None = None,
                ffn_mult: float = 2.0) -> dict[int, GatedCrossAttention]:
    """One gated cross-attention block per chosen decoder layer, shaped like the LLM's."""
    h = heads or llm.n_heads
    k = kv_heads or llm.n_kv_heads
    return {i: GatedCrossAttention(dim=llm.dim, media_dim=media_dim, n_heads=h, n_kv_heads=k,
                                   head_dim=llm.dim // h, ffn_dim=int(ffn_mult * llm.dim), norm_eps=llm.norm_eps)
            for i in xattn_layers(llm.n_layers, every=every, first=first, layers=layers)}


def build(llm: LLMShape, *, encoder: dict | None = None, adapter: dict | None = None) -> Modality:
    enc = dict(encoder or {})
    enc.setdefault("out_dim", llm.dim)
    e = image_encoder(**enc)
    return Modality(kind="xattn", encoder=e, xattn=build_xattn(llm, e.out_dim, **(adapter or {})))


def preprocess(img, modality: Modality, *, max_tiles: int | None = None) -> dict:
    """PIL image -> tiles padded to the encoder's tile count (fewer tiles when asked)."""
    enc = modality.encoder
    use = min(max_tiles or enc.max_tiles, enc.max_tiles)
    tiles, mask, aspect = tile_image(img, tile_size=enc.tile_size, max_tiles=use)
    grid = possible_grids(use)[aspect]
    return {"pixels": tiles, "tile_mask": mask, "aspect": torch.tensor(possible_grids(enc.max_tiles).index(grid))}


IMAGE = ModalityType(
    name="image", kind="xattn", build=build, read=load_image, preprocess=preprocess,
    suffixes=(".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
    prompt="Describe the image.",
)
