"""The video modality: sampled frames -> (frozen copy of) the image encoder -> perceiver
resampler over runs of K frames -> gated cross-attention, as in Llama 3 (section 7.2).

Notation: b=batch, F=max frames, f=frames, s=frame side (the image encoder's tile size),
p=tokens per frame, g=groups of K frames, m=latents per group, e=feature width, d=LLM width.

The video modality holds its own copy of the image encoder (modules are never shared across
modalities: safetensors refuses shared tensors). A video stage initialises that copy from the
image run with ``init_copy: {video.encoder.image_encoder.image: image.encoder}`` and keeps it
frozen. Its cross-attention layers sit before every 4th image cross-attention layer (the same
decoder layer as that image layer), with zero-initialised gates.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from encoders.image import ImageEncoder, image_encoder
from encoders.image_io import MEAN, STD
from encoders.video import VideoEncoder, video_aggregator
from encoders.video_io import VideoError, load_video, video_info
from mm.modalities.base import LLMShape, ModalityType, xattn_layers
from mm.modalities.image import build_xattn
from mm.modality import Modality

__all__ = ["VIDEO", "FrameEncoder", "build", "read", "preprocess", "video_xattn_layers",
           "image_adapter_copy", "moving_shapes_records", "SUFFIXES"]

SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")
DEFAULT_MAX_FRAMES = 64  # Llama 3: up to 64 frames sampled uniformly
IMAGE_ENCODER_PREFIX = "video.encoder.image_encoder.image"  # where the image encoder copy lives


class FrameEncoder(nn.Module):
    """Frames as single tiles through an :class:`ImageEncoder`.

    forward(pixels (N, 3, s, s) uint8) -> features (N, p, e). Normalises like the image path
    (open_clip's mean / std); every frame is one tile with the 1x1 grid's aspect id.
    """

    def __init__(self, image: ImageEncoder):
        super().__init__()
        self.image = image

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        x = pixels.float() / 255.0  # (N, 3, s, s)
        x = (x - x.new_tensor(MEAN)[:, None, None]) / x.new_tensor(STD)[:, None, None]
        feats, _ = self.image(x[:, None], torch.ones(n, 1, dtype=torch.bool, device=x.device),
                              torch.zeros(n, dtype=torch.long, device=x.device))  # (N, p, e)
        return feats


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


def image_adapter_copy(layers: list[int], image_layers: list[int] | None = None, *, gates: bool = False) -> dict[str, str]:
    """``init_copy`` entries that initialise video cross-attention block ``layers[i]`` from the
    image block ``image_layers[i]`` (default: the same layer). Gates are not copied unless
    ``gates``: they stay zero, so the stage still starts from the text model."""
    image_layers = image_layers or layers
    subs = ("attn_norm", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "o_proj", "mlp_norm", "mlp")
    out = {f"video.xattn.{v}.{s}": f"image.xattn.{i}.{s}" for v, i in zip(layers, image_layers) for s in subs}
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
            32 fine-tuning), ``num_latents`` (default: tokens per frame, so that K frames
            merge into one), ``depth``, ``num_heads``, ``ffn_mult``.
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
    agg.setdefault("num_latents", grid * grid + 1)  # K frames -> one frame's worth of tokens
    video = VideoEncoder(FrameEncoder(image), video_aggregator(dim=image.out_dim, **agg),
                         freeze_image_encoder=freeze_image_encoder)
    video.max_frames = int(max_frames)  # plain settings read by preprocess, not per-call state
    video.frame_size = image.tile_size
    ad = dict(adapter or {})
    place = {k: ad.pop(k) for k in ("image_layers", "every_image", "layers") if k in ad}
    layers = video_xattn_layers(llm.n_layers, **place)
    return Modality(kind="xattn", encoder=video, xattn=build_xattn(llm, image.out_dim, layers=layers, **ad))


def read(path: Path) -> Path:
    """Check the file; decoding happens in :func:`preprocess`, where the frame count and size
    are known (memory is bounded by them, never by the file)."""
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: video file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise VideoError(f"{path}: video file is empty (0 bytes)")
    return path


def _fit(height: int, width: int, side: int) -> tuple[int, int]:
    """Largest (h, w) within side x side with the frame's aspect ratio (as images: no crop)."""
    scale = side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def preprocess(path: Path, modality: Modality, *, max_frames: int | None = None,
               single_frame: bool = False) -> dict:
    """Decode up to F uniformly sampled frames, resized to fit one tile (aspect kept, padded
    with black at the bottom / right as images are), padded to F frames.

    ``single_frame``: keep only the middle sampled frame, in its place (other frames masked):
    the single-frame baseline.

    Returns ``{"frames": (F, 3, s, s) uint8, "frame_mask": (F,) bool}``.
    """
    enc = modality.encoder
    F = int(max_frames or enc.max_frames)
    s = enc.frame_size
    info = video_info(path)
    h, w = _fit(info.height, info.width, s)
    clip = load_video(path, max_frames=F, size=(h, w))  # (f, 3, h, w) uint8
    f = clip.shape[0]
    frames = torch.zeros(F, 3, s, s, dtype=torch.uint8)
    frames[:f, :, :h, :w] = clip
    mask = torch.arange(F) < f
    if single_frame:
        mid = f // 2
        keep = torch.arange(F) == mid
        frames = frames * keep[:, None, None, None].to(frames.dtype)
        mask = keep
    return {"frames": frames, "frame_mask": mask}


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

    from mm.sources.moving_shapes import make_dataset, read_manifest

    if task not in ("caption", "qa"):
        raise ValueError(f"moving-shapes: task must be caption or qa, not {task!r}")
    root = Path(root)
    params = {"n": n, "seed": seed, "num_frames": num_frames, "size": size, "fps": fps, "clips": list(clips)}
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
