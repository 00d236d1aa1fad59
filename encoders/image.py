"""Image encoder: an open_clip ViT with multi-layer features, gated global layers and tiles.

Notation: b=batch of images, T=tiles per image, p=tokens per tile (patches + class token),
w=ViT width, L=number of feature layers, e=output width.

As in Llama 3: every tile goes through the ViT on its own; features of several layers are
kept; the final layer's tokens of all tiles of an image then go through a few *gated*
self-attention layers (global, across tiles, with tile-position embeddings); the final
output and the intermediate layers are concatenated ((L+1) * w per token) and projected.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from encoders.frozen import fixed

__all__ = ["ImageEncoder", "GatedBlock", "build_vit", "image_encoder", "load_open_clip_visual",
           "default_layer_indices", "VIT_PRESETS"]

# open_clip vision tower configs. "h14" is the ViT-H/14 of Llama 3 (630M).
VIT_PRESETS = {
    "tiny": dict(image_size=32, patch_size=8, width=96, layers=4, head_width=32, mlp_ratio=2.0),
    "small": dict(image_size=224, patch_size=16, width=384, layers=12, head_width=64, mlp_ratio=4.0),
    "b16": dict(image_size=224, patch_size=16, width=768, layers=12, head_width=64, mlp_ratio=4.0),
    "h14": dict(image_size=224, patch_size=14, width=1280, layers=32, head_width=80, mlp_ratio=4.0),
}


def default_layer_indices(depth: int) -> list[int]:
    """Llama 3 takes layers 4, 8, 16, 24, 31 of 32 (1-based); spread the same way over
    ``depth`` and return 0-based indices (the final layer is always added on top)."""
    frac = [4 / 32, 8 / 32, 16 / 32, 24 / 32, 31 / 32]
    return sorted({max(0, min(depth - 2, round(f * depth) - 1)) for f in frac})


def build_vit(*, preset: str = "tiny", image_size: int | None = None, **overrides) -> nn.Module:
    """An open_clip ``VisionTransformer`` (random init, no network)."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if preset not in VIT_PRESETS:
        raise KeyError(f"unknown ViT preset {preset!r}; choose one of {sorted(VIT_PRESETS)}")
    cfg = dict(VIT_PRESETS[preset], **overrides)
    if image_size:
        cfg["image_size"] = image_size
    vit = _build_vision_tower(embed_dim=cfg["width"], vision_cfg=CLIPVisionCfg(**cfg))
    if cfg.get("block_type") == "custom":
        # open_clip's own attention block: one q/k/v product split into heads by views, then
        # SDPA. nn.MultiheadAttention (the default block) copies its packed projection into a
        # (3, L, N, w) tensor and back on every call; same parameter names, same outputs, and
        # ~23% off the tiny ViT's training step on a CPU. Drawn as nn.MultiheadAttention
        # draws them (open_clip's block uses randn * head_dim**-0.5 for the q/k/v weights).
        with torch.no_grad():
            for blk in vit.transformer.resblocks:
                blk.__class__ = _custom_block_class()
                nn.init.xavier_uniform_(blk.attn.in_proj_weight)
                nn.init.zeros_(blk.attn.in_proj_bias)
                nn.init.zeros_(blk.attn.out_proj.bias)
    return vit


@functools.cache
def _custom_block_class():
    from open_clip.transformer import CustomResidualAttentionBlock

    class CustomBlock(CustomResidualAttentionBlock):
        """open_clip's custom block, callable as its default block is: open_clip 3.3's
        Transformer calls ``checkpoint(block, x, None, None, attn_mask)`` under activation
        checkpointing for every block type, a signature only the default block takes."""

        def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
            return super().forward(q_x, attn_mask=attn_mask)

    return CustomBlock


def load_open_clip_visual(vit: nn.Module, path: str | Path) -> None:
    """Load the ``visual.*`` weights of an open_clip checkpoint (safetensors, or a torch
    file read with ``weights_only=True``) into ``vit``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    visual = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")} or sd
    missing, unexpected = vit.load_state_dict(visual, strict=False)
    if missing:
        raise ValueError(f"{path}: open_clip checkpoint lacks {len(missing)} ViT weights, e.g. {missing[:3]}")


class GatedBlock(nn.Module):
    """Pre-norm transformer block whose attention and MLP pass through tanh gates."""

    def __init__(self, *, dim: int, n_heads: int, mlp_ratio: float = 4.0, gate_init: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.gate_attn = nn.Parameter(torch.full((1,), gate_init))
        self.gate_mlp = nn.Parameter(torch.full((1,), gate_init))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (b, m, w); mask: (b, m) bool key mask, or None when every key counts. Returns (b, m, w)."""
        b, m, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, m, 3, self.n_heads, w // self.n_heads).permute(2, 0, 3, 1, 4)
        # CUDA SDPA puts a mask whose last dimension has stride 0 (an expanded view, as a
        # one-tile mask once was here) on its math path: 16.9 ms forward+backward against 2.2 ms
        # for the same mask contiguous at (8, 20, 1601, 64) on an H200 (scripts/sdpa_paths.py),
        # ~55 of a 242 ms bench step over 8 layers. Contiguous masks take the cuDNN kernel.
        if mask is not None:
            mask = mask.contiguous()[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.gate_attn.tanh() * self.proj(a.transpose(1, 2).reshape(b, m, w))
        return x + self.gate_mlp.tanh() * self.mlp(self.norm2(x))


class ImageEncoder(nn.Module):
    """Tiled multi-layer ViT features for cross-attention.

    Args:
        vit: an open_clip ``VisionTransformer``.
        layer_indices: 0-based ViT blocks whose outputs are kept (the final block is added).
        out_dim: output width e (the cross-attention adapters' media width).
        gated_layers: number of gated global self-attention layers (Llama 3: 8).
        max_tiles: tiles per image T (Llama 3: 4).
        gate_init: initial value of the global layers' gates (0: identity at start).
    """

    def __init__(self, *, vit: nn.Module, layer_indices: list[int], out_dim: int,
                 gated_layers: int = 0, max_tiles: int = 1, gate_init: float = 0.0):
        super().__init__()
        from encoders.image_io import possible_grids

        self.vit = vit
        depth = len(vit.transformer.resblocks)
        self.layer_indices = sorted(set(layer_indices) - {depth - 1})
        if any(not 0 <= i < depth for i in self.layer_indices):
            raise ValueError(f"layer_indices {layer_indices} outside the ViT's 0..{depth - 1}")
        self.max_tiles = max_tiles
        w = vit.transformer.width
        heads = max(1, w // 64) if w % 64 == 0 else max(1, w // 32)
        n_grids = len(possible_grids(max_tiles))
        self.tile_embed = nn.Parameter(torch.zeros(n_grids, max_tiles, w))
        self.tile_gate = nn.Parameter(torch.zeros(1))
        self.blocks = nn.ModuleList(GatedBlock(dim=w, n_heads=heads, gate_init=gate_init) for _ in range(gated_layers))
        n_feat = (len(self.layer_indices) + 1) * w
        self.norm = nn.LayerNorm(n_feat)
        self.proj = nn.Linear(n_feat, out_dim)
        self.out_dim = out_dim

    @property
    def tile_size(self) -> int:
        s = self.vit.image_size
        return s[0] if isinstance(s, (tuple, list)) else s

    def forward(self, pixels: torch.Tensor, tile_mask: torch.Tensor,
                aspect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            pixels: (b, T, 3, s, s) normalised tiles; tile_mask: (b, T) bool; aspect: (b,) long.
        Returns:
            features (b, T * p, e) and mask (b, T * p).
        """
        layers = self._vit_layers(pixels)
        x = self._global(layers[-1], tile_mask, aspect)
        return self._project(torch.cat([x] + layers[:-1], dim=-1), tile_mask)  # (b, T*p, (L+1)*w)

    # -- the parts, for a feature cache (mm.modality.FeatureCache) -------------------------
    def cache_cut(self) -> str | None:
        """How far this encoder is fixed in the current stage: ``"blocks"`` when the ViT, the
        tile embeddings and the gated layers all are (only the norm and projection train),
        ``"vit"`` when the ViT is, else None. The front part's output is then a function of
        the image alone."""
        if not fixed(self.vit):
            return None
        return "blocks" if fixed(self.tile_embed, self.tile_gate, self.blocks) else "vit"

    def trunk(self, pixels: torch.Tensor, tile_mask: torch.Tensor, aspect: torch.Tensor, *,
              cut: str) -> torch.Tensor:
        """The front part up to ``cut``: (b, T * p, (L+1) * w), the last ViT layer's output
        (after the gated layers for ``"blocks"``) followed by the kept intermediate layers."""
        layers = self._vit_layers(pixels)
        x = self._global(layers[-1], tile_mask, aspect) if cut == "blocks" else layers[-1]
        return torch.cat([x] + layers[:-1], dim=-1)

    def head(self, trunk: torch.Tensor, pixels=None, tile_mask: torch.Tensor = None, aspect: torch.Tensor = None, *,
             cut: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest after :meth:`trunk`: the same (features, mask) as :meth:`forward`."""
        if cut == "vit" and self.blocks:
            w = self.vit.transformer.width
            trunk = torch.cat([self._global(trunk[..., :w], tile_mask, aspect), trunk[..., w:]], dim=-1)
        return self._project(trunk, tile_mask)

    def _vit_layers(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The kept ViT layers' outputs (class token first), each (b, T * p, w); the last
        ViT layer last."""
        b, T = pixels.shape[:2]
        depth = len(self.vit.transformer.resblocks)
        out = self.vit.forward_intermediates(
            pixels.flatten(0, 1), indices=self.layer_indices + [depth - 1], output_fmt="NLC",
            intermediates_only=True, output_extra_tokens=True)
        layers = [torch.cat([c, x], dim=1) for c, x in zip(out["image_intermediates_prefix"], out["image_intermediates"])]
        return [y.reshape(b, T * y.shape[1], -1) for y in layers]

    def _global(self, x: torch.Tensor, tile_mask: torch.Tensor, aspect: torch.Tensor) -> torch.Tensor:
        """Tile-position embeddings and the gated global layers: (b, T * p, w) -> same."""
        if not self.blocks:
            return x
        b, T = tile_mask.shape
        p = x.shape[1] // T
        pos = self.tile_embed[aspect][:, :T]  # (b, T, w)
        x = x + self.tile_gate.tanh() * pos[:, :, None, :].expand(b, T, p, -1).reshape(b, T * p, -1)
        # one tile: the image is either all keys or unused (its features are masked out
        # downstream), so no key mask is needed and attention takes the fused kernels
        key_mask = self._mask(tile_mask, p) if T > 1 else None
        for blk in self.blocks:
            x = blk(x, key_mask)
        return x

    def _project(self, feats: torch.Tensor, tile_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, T * p, (L+1) * w) -> features (b, T * p, e) and mask (b, T * p)."""
        return self.proj(self.norm(feats)), self._mask(tile_mask, feats.shape[1] // tile_mask.shape[1])

    @staticmethod
    def _mask(tile_mask: torch.Tensor, p: int) -> torch.Tensor:
        b, T = tile_mask.shape
        return tile_mask[:, :, None].expand(b, T, p).reshape(b, T * p)


def image_encoder(*, preset: str = "tiny", out_dim: int, tile_size: int | None = None, max_tiles: int = 1,
                  layer_indices: list[int] | None = None, gated_layers: int | None = None,
                  checkpoint: str | None = None, gate_init: float = 0.0, vit: dict | None = None) -> ImageEncoder:
    """Build an :class:`ImageEncoder` from a ViT preset (``tiny`` for CPU, ``h14`` for Llama 3);
    ``vit`` overrides preset fields (``patch_size``, ``width``, ``layers``...)."""
    vit = build_vit(preset=preset, image_size=tile_size, **(vit or {}))
    if checkpoint:
        load_open_clip_visual(vit, checkpoint)
    depth = len(vit.transformer.resblocks)
    if gated_layers is None:
        gated_layers = 8 if preset == "h14" else max(1, depth // 4)
    return ImageEncoder(vit=vit, layer_indices=layer_indices if layer_indices is not None else default_layer_indices(depth),
                        out_dim=out_dim, gated_layers=gated_layers, max_tiles=max_tiles, gate_init=gate_init)
