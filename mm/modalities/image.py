"""The image modality: tiled open_clip ViT features through gated cross-attention."""

from __future__ import annotations

import torch

from encoders.image import image_encoder
from encoders.image_io import load_image, possible_grids, tile_image
from mm.modality import Modality
from mm.modalities.base import LLMShape, ModalityType, cross_attention_modality


def build(llm: LLMShape, *, encoder: dict | None = None, adapter: dict | None = None) -> Modality:
    """``encoder``: :func:`encoders.image.image_encoder` options; ``adapter``: placement and
    sizes for :func:`mm.modalities.base.cross_attention_modality`."""
    enc = dict(encoder or {})
    enc.setdefault("out_dim", llm.dim)
    e = image_encoder(**enc)
    return cross_attention_modality(llm, e, media_dim=e.out_dim, **(adapter or {}))


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
