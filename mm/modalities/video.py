"""The video modality: sampled frames -> (frozen copy of) the image encoder -> perceiver
resampler over runs of K frames -> gated cross-attention, as in Llama 3 (section 7.2).

Notation: b=batch, F=max frames, f=frames, T=max tiles per frame, s=tile side, p=tokens per
tile, n=T*p tokens per frame, g=groups of K frames, m=latents per group, e=feature width.

Frames are resized and tiled like images (the grid that fits the video best, up to
``max_tiles``), all frames of a video on the same grid.

The video modality holds its own copy of the image encoder (modules are never shared across
modalities: safetensors refuses shared tensors). A video stage initialises that copy from the
image run with ``init_copy: {video.encoder.image_encoder.image: image.encoder}`` and keeps it
frozen. Its cross-attention layers sit before every 4th image cross-attention layer (the same
decoder layer as that image layer), with zero-initialised gates.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from encoders.image import ImageEncoder, image_encoder
from encoders.image_io import MEAN, STD, best_grid, possible_grids
from encoders.video import VideoEncoder, video_aggregator
from encoders.video_io import VideoError, load_video, video_info
from mm.modalities.base import LLMShape, ModalityType, cross_attention_modality, xattn_layers
from mm.modality import Modality

__all__ = ["VIDEO", "FrameEncoder", "TiledVideoEncoder", "SpaceTimeResampler", "build", "read", "preprocess", "video_xattn_layers",
           "image_adapter_copy", "XATTN_PARTS", "moving_shapes_records", "SUFFIXES"]

SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")
DEFAULT_MAX_FRAMES = 64  # Llama 3: up to 64 frames sampled uniformly
IMAGE_ENCODER_PREFIX = "video.encoder.image_encoder.image"  # where the image encoder copy lives


class FrameEncoder(nn.Module):
    """Frames, each cut into tiles like an image, through an :class:`ImageEncoder`.

    forward(pixels (N, T, 3, s, s) uint8, tile_mask (N, T) bool, aspect (N,) long)
        -> features (N, T*p, e)

    Normalises like the image path (open_clip's mean / std). Features of padding tiles are
    zeroed (the temporal aggregator takes a mask per frame, not per token).
    """

    def __init__(self, image: ImageEncoder):
        super().__init__()
        self.image = image

    def forward(self, pixels: torch.Tensor, tile_mask: torch.Tensor, aspect: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 255.0  # (N, T, 3, s, s)
        x = (x - x.new_tensor(MEAN)[:, None, None]) / x.new_tensor(STD)[:, None, None]
        feats, mask = self.image(x, tile_mask, aspect)  # (N, T*p, e), (N, T*p)
        return feats * mask[..., None].to(feats.dtype)


class TiledVideoEncoder(VideoEncoder):
    """:class:`encoders.video.VideoEncoder` whose frames are tiled like images: every frame of
    a video shares the video's tile grid.

    forward(frames (b, f, T, 3, s, s) uint8, frame_mask (b, f), tile_mask (b, T), aspect (b,))
        -> (features (b, g*m, e), mask (b, g*m))
    """

    def trunk(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None,
              tile_mask: torch.Tensor | None = None, aspect: torch.Tensor | None = None, *,
              cut: str = "frames") -> torch.Tensor:
        """Per-frame image features (b, f, n, e); padding frames are zeros, not encoded."""
        b, f, T = frames.shape[:3]
        if tile_mask is None:
            tile_mask = torch.ones(b, T, dtype=torch.bool, device=frames.device)
        if aspect is None:
            aspect = torch.zeros(b, dtype=torch.long, device=frames.device)
        tiles = tile_mask[:, None].expand(b, f, T).flatten(0, 1)  # (b*f, T)
        grids = aspect[:, None].expand(b, f).flatten()  # (b*f,)
        pixels = frames.flatten(0, 1)  # (b*f, T, 3, s, s)
        return self._per_frame(frames, frame_mask,
                               lambda keep: self.image_encoder(pixels[keep], tiles[keep], grids[keep]))


class SpaceTimeResampler(nn.Module):
    """The perceiver resampler with a learned embedding per token position within a frame
    added first (it brings the frame-position embeddings of the resampler a spatial
    counterpart: attention pools a set of tokens, so without it "where" is only what the
    image features happen to keep, and motion is hard to learn).

    ``pool_tokens`` P > 0 appends P tokens per group of K frames, each a learned fixed
    weighting of the group's frame tokens by (frame, token position): pooled_p = LayerNorm(W
    sum_{k,i} a[p, k, i] x[k, i]). Attention pools by content, so a perceiver trained for a
    few hundred steps averages time away (on the demo's clips a linear probe reads the
    direction of motion off the frame tokens 98% right, off the trained perceiver's output 40%);
    a weighting that depends on when and where can express "later and further right" directly.

    forward(x (b, f, n, e), frame_mask (b, f)) -> (tokens (b, g*(m+P), e), mask (b, g*(m+P)))
    """

    def __init__(self, resampler: nn.Module, *, tokens_per_frame: int, dim: int, std: float = 0.02,
                 pool_tokens: int = 0, pool_center: bool = False):
        super().__init__()
        self.pool_center = bool(pool_center)
        self.token_pos = nn.Parameter(torch.randn(tokens_per_frame, dim) * std)  # (n, e)
        self.resampler = resampler
        self.pool_tokens = int(pool_tokens)
        if self.pool_tokens:
            K = resampler.frames_per_group
            self.pool = nn.Parameter(torch.randn(self.pool_tokens, K, tokens_per_frame) / (K * tokens_per_frame) ** 0.5)
            self.pool_proj = nn.Linear(dim, dim, bias=False)
            self.pool_norm = nn.LayerNorm(dim)

    @property
    def frames_per_group(self) -> int:
        return self.resampler.frames_per_group

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None):
        x = x + self.token_pos[: x.shape[2]].to(x.dtype)  # fewer tiles: a prefix
        tokens, mask = self.resampler(x, frame_mask)  # (b, g*m, e), (b, g*m)
        if not self.pool_tokens:
            return tokens, mask
        b, f, n, e = x.shape
        K, P, m = self.frames_per_group, self.pool_tokens, self.resampler.num_latents
        g = tokens.shape[1] // m
        group_mask = mask.view(b, g, m)[:, :, 0]  # (b, g): the resampler's, a group with a valid frame
        if frame_mask is not None:
            x = x.masked_fill(~frame_mask.to(torch.bool)[:, :, None, None], 0.0)
        x = F.pad(x, (0, 0, 0, 0, 0, g * K - f)).view(b, g, K, n, e)  # (b, g, K, n, e)
        if self.pool_center:  # each token position minus its mean over the group's valid frames
            valid = F.pad(frame_mask.to(x.dtype) if frame_mask is not None else x.new_ones(b, f),
                          (0, g * K - f)).view(b, g, K, 1, 1)
            mean = (x * valid).sum(2, keepdim=True) / valid.sum(2, keepdim=True).clamp(min=1)
            x = (x - mean) * valid
        pooled = torch.einsum("bgkne,pkn->bgpe", x, self.pool[:, :, :n].to(x.dtype))  # (b, g, P, e)
        pooled = self.pool_norm(self.pool_proj(pooled)) * group_mask[:, :, None, None].to(x.dtype)
        tokens = torch.cat([tokens.view(b, g, m, e), pooled], dim=2).reshape(b, g * (m + P), e)
        mask = torch.cat([mask.view(b, g, m), group_mask[:, :, None].expand(b, g, P)], dim=2).reshape(b, -1)
        return tokens, mask


def video_xattn_layers(n_layers: int, *, image_layers: list[int] | dict | None = None, every_image: int = 4,
                       layers: list[int] | None = None) -> list[int]:
    """Decoder layers of the video cross-attention blocks: explicit ``layers``, or the layer of
    every ``every_image``-th image cross-attention block (the 4th, 8th, ...; the video block
    runs there too). ``image_layers``: the image blocks' layers, or the image adapter's
    options (``{every: 4, first: 15}``). With fewer image blocks than ``every_image``, the
    last one."""
    if layers is not None:
        return sorted(layers)
    img = xattn_layers(n_layers, **(image_layers or {})) if not isinstance(image_layers, list) else sorted(image_layers)
    return img[every_image - 1::every_image] or img[-1:]


# a cross-attention block's parts other than its two gates (what init_copy copies between blocks)
XATTN_PARTS = ("attn_norm", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "o_proj", "mlp_norm", "mlp")


def image_adapter_copy(layers: list[int], image_layers: list[int] | None = None, *, gates: bool = False) -> dict[str, str]:
    """``init_copy`` entries that initialise video cross-attention block ``layers[i]`` from the
    image block ``image_layers[i]`` (default: the same layer). Gates are not copied unless
    ``gates``: they stay zero, so the stage still starts from the text model."""
    image_layers = image_layers or layers
    out = {f"video.xattn.{v}.{s}": f"image.xattn.{i}.{s}" for v, i in zip(layers, image_layers) for s in XATTN_PARTS}
    if gates:  # a gate is a single tensor, not a prefix of tensors: copy the whole block instead
        out = {f"video.xattn.{v}": f"image.xattn.{i}" for v, i in zip(layers, image_layers)}
    return out


def build(llm: LLMShape, *, encoder: dict | None = None, aggregator: dict | None = None,
          adapter: dict | None = None, max_frames: int = DEFAULT_MAX_FRAMES,
          freeze_image_encoder: bool = True) -> Modality:
    """Video modality from YAML options.

    Args:
        encoder: the image encoder's options, as in the image modality (copy them from the
            image run so its weights load into the copy).
        aggregator: perceiver resampler options: ``frames_per_group`` (K; 16 pre-training,
            32 fine-tuning), ``num_latents`` (default: tokens per tile, so that K frames
            merge into one), ``depth``, ``num_heads``, ``ffn_mult``, and ``pos_std``: initial
            scale of the frame- and token-position embeddings (default 0.02; the CPU demo
            uses 1.0, the features' own scale, so that position matters from step 0), and
            ``pool_tokens``: learned (frame, position) poolings appended per group
            (:class:`SpaceTimeResampler`; default 0, the plain resampler), and
            ``pool_center``: pool each token position's change from its mean over the
            group's frames instead of the features themselves (default false).
        adapter: ``image_layers`` (the image adapter's layers or options) and ``every_image``,
            or explicit ``layers``; and ``heads``, ``kv_heads``, ``ffn_mult`` of the blocks.
        max_frames: F, frames sampled per video (default; a stage may lower it in preprocess).
        freeze_image_encoder: run the image encoder copy without gradients, in eval mode.
    """
    enc = dict(encoder or {})
    enc.setdefault("out_dim", llm.dim)
    image = image_encoder(**enc)
    agg = dict(aggregator or {})
    grid = image.tile_size // image.vit.patch_size[0]
    agg.setdefault("num_latents", grid * grid + 1)  # K frames -> one tile's worth of tokens
    pos_std = agg.pop("pos_std", 0.02)
    pool_tokens = agg.pop("pool_tokens", 0)
    pool_center = agg.pop("pool_center", False)
    resampler = video_aggregator(dim=image.out_dim, **agg)
    with torch.no_grad():  # frame-position embeddings on the same scale as the spatial ones
        resampler.frame_pos.normal_(0.0, pos_std)
    tokens = image.max_tiles * (grid * grid + 1)
    aggregator_ = SpaceTimeResampler(resampler, tokens_per_frame=tokens, dim=image.out_dim, std=pos_std,
                                     pool_tokens=pool_tokens, pool_center=pool_center)
    video = TiledVideoEncoder(FrameEncoder(image), aggregator_, freeze_image_encoder=freeze_image_encoder)
    video.max_frames = int(max_frames)  # plain settings read by preprocess, not per-call state
    video.frame_size = image.tile_size
    video.max_tiles = image.max_tiles
    ad = dict(adapter or {})
    place = {k: ad.pop(k) for k in ("image_layers", "every_image", "layers") if k in ad}
    layers = video_xattn_layers(llm.n_layers, **place)
    return cross_attention_modality(llm, video, media_dim=image.out_dim, layers=layers, **ad)


def read(path: Path) -> Path:
    """Check the file; decoding happens in :func:`preprocess`, where the frame count and size
    are known (memory is bounded by them, never by the file)."""
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: video file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise VideoError(f"{path}: video file is empty (0 bytes)")
    return path


def preprocess(path: Path, modality: Modality, *, max_frames: int | None = None, max_tiles: int | None = None,
               single_frame: bool = False) -> dict:
    """Decode up to F uniformly sampled frames, resized and tiled like images (the tile grid
    that fits the video best, up to ``max_tiles``; aspect kept, black padding at the bottom /
    right), padded to F frames. Frames are resized while decoding: memory is bounded by F
    and the grid, never by the file.

    ``single_frame``: keep only the middle sampled frame, in its place (other frames masked):
    the single-frame baseline.

    Returns ``{"frames": (F, T, 3, s, s) uint8, "frame_mask": (F,) bool, "tile_mask": (T,)
    bool, "aspect": () long}`` with T = ``max_tiles`` (default: the encoder's), padded like
    images are.
    """
    enc = modality.encoder
    F = int(max_frames or enc.max_frames)
    s, T = enc.frame_size, enc.max_tiles
    use = min(max_tiles or T, T)
    info = video_info(path)
    cols, rows = best_grid(info.width, info.height, s, use)
    scale = min(cols * s / info.width, rows * s / info.height)
    h, w = max(1, round(info.height * scale)), max(1, round(info.width * scale))
    clip = load_video(path, max_frames=F, size=(h, w))  # (f, 3, h, w) uint8
    f = clip.shape[0]
    canvas = clip.new_zeros(f, 3, rows * s, cols * s)
    canvas[:, :, :h, :w] = clip
    tiles = canvas.view(f, 3, rows, s, cols, s).permute(0, 2, 4, 1, 3, 5).reshape(f, rows * cols, 3, s, s)
    frames = torch.zeros(F, use, 3, s, s, dtype=torch.uint8)
    frames[:f, :rows * cols] = tiles
    mask = torch.arange(F) < f
    if single_frame:
        keep = torch.arange(F) == f // 2
        frames = frames * keep[:, None, None, None, None].to(frames.dtype)
        mask = keep
    return {"frames": frames, "frame_mask": mask, "tile_mask": torch.arange(use) < rows * cols,
            "aspect": torch.tensor(possible_grids(T).index((cols, rows)))}


# -- the built-in synthetic source ---------------------------------------------------------
def moving_shapes_records(root: str, *, split: str = "train", n: int = 256, seed: int = 0,
                          num_frames: int = 16, size: int = 32, fps: int = 8,
                          clips: list[str] | tuple[str, ...] = ("motion", "order"),
                          task: str = "caption", prompt: str = "Describe the video.",
                          limit: int = 0) -> list[dict]:
    """Synthetic clips of moving shapes (written under ``root`` once, then reused).

    ``task``: ``caption`` (target: "a red circle moves left") or ``qa`` (the clip's question,
    e.g. "which way does the shape move?" -> "left"). Both need more than one frame.
    """
    import json

    from mm.sources.moving_shapes import ENCODING, make_dataset, read_manifest

    if task not in ("caption", "qa"):
        raise ValueError(f"moving-shapes: task must be caption or qa, not {task!r}")
    root = Path(root)
    params = {"n": n, "seed": seed, "num_frames": num_frames, "size": size, "fps": fps, "clips": list(clips),
              "encoding": ENCODING}
    stamp = root / f"{split}.params.json"
    manifest = root / f"{split}.jsonl"
    if not (manifest.exists() and stamp.exists() and json.loads(stamp.read_text()) == params):
        make_dataset(root, n=n, seed=seed, split=split, num_frames=num_frames, size=size, fps=fps,
                     tasks=tuple(clips))
        stamp.write_text(json.dumps(params))
    out = []
    for i, r in enumerate(read_manifest(manifest)):
        question, text = (prompt, r["text"]) if task == "caption" else (r["question"], r["answer"])
        clip = "motion" if r["question"].startswith("which way") else "order"
        out.append({"video": r["video"], "question": question, "text": text, "task": task, "clip": clip,
                    "_where": f"{manifest}:{i + 1}"})
    return out[:limit] if limit else out


VIDEO = ModalityType(
    name="video", kind="xattn", build=build, read=read, preprocess=preprocess,
    suffixes=SUFFIXES, prompt="Describe the video.",
    sources={"moving-shapes": moving_shapes_records},
)
