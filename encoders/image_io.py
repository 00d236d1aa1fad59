"""Reading images and cutting them into tiles.

Notation: T=max tiles, s=tile size in pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# open_clip's OpenAI CLIP normalisation.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image cannot be used; the message is one line naming the file."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit scaled down, alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as RGB, or raise :class:`ImageError` naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with Image.open(path) as img:
            img.load()
            out = to_rgb(img)
    except Image.DecompressionBombError as e:  # not an OSError: would escape as a traceback
        raise ImageError(f"{path}: image too large ({str(e).split(',')[0]})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image (corrupt or unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({str(e).splitlines()[0]})") from None
    if out.width == 0 or out.height == 0:
        raise ImageError(f"{path}: image has no pixels")
    return out


def possible_grids(max_tiles: int) -> list[tuple[int, int]]:
    """Every (cols, rows) with cols * rows <= max_tiles; the index is the aspect-ratio id."""
    return [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles]


def best_grid(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """Pick the tile grid for an image: the least down-scaling, or if every grid needs
    up-scaling the least up-scaling; ties go to the smallest canvas."""
    grids = possible_grids(max_tiles)
    scales = [min(c * tile / width, r * tile / height) for c, r in grids]
    up = [s for s in scales if s >= 1.0]
    target = min(up) if up else max(scales)
    cands = [g for g, s in zip(grids, scales) if s == target]
    return min(cands, key=lambda g: g[0] * g[1])


def tile_image(img: Image.Image, *, tile_size: int, max_tiles: int,
               mean=MEAN, std=STD) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Resize keeping the aspect ratio to fit the best grid, pad, and cut into tiles.

    Returns:
        tiles: (T, 3, s, s) normalised float, padded with zeros to ``max_tiles``;
        tile_mask: (T,) bool, True for real tiles;
        aspect_id: index of the grid in :func:`possible_grids`.
    """
    cols, rows = best_grid(img.width, img.height, tile_size, max_tiles)
    scale = min(cols * tile_size / img.width, rows * tile_size / img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = Image.new("RGB", (cols * tile_size, rows * tile_size), (0, 0, 0))
    canvas.paste(img.resize((w, h), Image.BICUBIC), (0, 0))
    x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    x = x.reshape(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile_size, tile_size)
    tiles = torch.zeros(max_tiles, 3, tile_size, tile_size)
    tiles[: rows * cols] = x
    mask = torch.arange(max_tiles) < rows * cols
    return tiles, mask, possible_grids(max_tiles).index((cols, rows))
