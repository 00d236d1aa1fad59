"""Synthetic video source: short mp4 clips of coloured shapes, with captions and questions
that need time to answer.

Two kinds of clip (notation: f = frames, S = frame side in pixels):
- motion: one shape moves left, right, up or down. "which way does the shape move?" -> "left".
  The shape's position in the middle frame (index f // 2) is drawn from the same square for
  every direction, so the middle frame alone says nothing about the direction.
- order: two different shapes appear one after the other and both stay; both are visible by
  the middle frame. "which shape appears first?" -> "the triangle".

Records are {"video": path, "text": caption, "question": q, "answer": a}. `make_dataset` writes
clips plus a JSONL manifest (paths relative to the manifest) and is deterministic given the
seed: clip i depends only on (seed, split, i), to the byte (see `write_mp4`).
"""

from __future__ import annotations

import json
import os
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "ENCODING",
    "SHAPES",
    "make_dataset",
    "motion_clip",
    "order_clip",
    "read_manifest",
    "write_mp4",
]

# The shapes and colours of easy-vqa (its RGB values), on a light background as there: the demo's
# video path reuses the image encoder trained on easy-vqa, which has never seen other ones.
SHAPES = ("circle", "rectangle", "triangle")
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
BACKGROUND = (240, 240, 240)
QP, PRESET = 20, "veryfast"  # the clips' constant H.264 quantiser and x264 preset (see `write_mp4`)
# how clips are encoded; a change makes the demo write its clips again (their stamp holds it)
ENCODING = f"h264 qp{QP} {PRESET}"
TASKS = ("motion", "order")


def write_mp4(
    path: str | os.PathLike, frames: np.ndarray, fps: int | Fraction = 8, *, qp: int = QP
) -> None:
    """Write uint8 RGB frames (f, H, W, 3) as an H.264 (yuv420p) mp4 at the constant
    quantiser ``qp`` (0: lossless); H and W must be even.

    A constant quantiser, not x264's CRF rate control: with ``crf`` the same frames gave
    another bitstream, and other decoded pixels (by up to 9 of 255), for 3-12% of the demo's
    2,048 clips from one run to the next, more often on a loaded machine, although the
    encoder runs on one thread. At a constant quantiser the files were byte-identical in
    every run, and as close to the drawn frames (mean absolute error 2.38 of 255 at qp 20,
    2.50 at crf 20).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (f, H, W, 3), got {frames.dtype} {frames.shape}")
    f, height, width, _ = frames.shape
    if f == 0 or height % 2 or width % 2:
        raise ValueError(
            f"need >= 1 frame and even H, W for yuv420p, got (f, H, W) = {(f, height, width)}"
        )
    import av  # imported lazily: only writing clips needs it

    with av.open(os.fspath(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qp": str(qp), "preset": PRESET, "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _shape_mask(
    shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, aspect: float = 1.0
) -> np.ndarray:
    """Boolean (S, S) mask of a shape of half-size r centred at (cy, cx); a rectangle's
    height / width is ``aspect`` (its long side is 1.7 r, so it stays within r of the centre)."""
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "rectangle":
        short, long_ = 0.85 * r * min(aspect, 1 / aspect), 0.85 * r
        hy, hx = (long_, short) if aspect >= 1 else (short, long_)
        return (np.abs(dy) <= hy) & (np.abs(dx) <= hx)
    if shape == "triangle":  # apex up, base at 0.8 r below the centre
        depth = (dy + r) / (1.8 * r)  # 0 at the apex, 1 at the base
        return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * 1.1 * r)
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _aspect(rng: np.random.Generator) -> float:
    """A rectangle's height / width, 0.5 to 2 (drawn for every shape, used by rectangles)."""
    return float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))


def _blank(num_frames: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    frames[:] = BACKGROUND
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return frames, yy, xx


def motion_clip(
    rng: np.random.Generator, *, num_frames: int = 24, size: int = 64
) -> tuple[np.ndarray, dict]:
    """One shape moving in a straight line; returns frames (f, S, S, 3) and its texts."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    r = rng.uniform(0.12, 0.16) * size
    aspect = _aspect(rng)
    travel = 0.4 * size  # distance covered over the clip
    mid = num_frames // 2
    # Frame t sits at anchor + travel * (t - mid) / (f - 1) along the direction. The anchor
    # (position at the middle frame) is drawn from one square for every direction, wide
    # enough that the shape stays inside the frame whichever way it moves.
    reach = travel * max(mid, num_frames - 1 - mid) / (num_frames - 1)
    cy, cx = rng.uniform(r + reach, size - r - reach, size=2)
    dy, dx = DIRECTIONS[direction]
    frames, yy, xx = _blank(num_frames, size)
    for t in range(num_frames):
        step = travel * (t - mid) / (num_frames - 1)
        frames[t][_shape_mask(shape, yy, xx, cy + dy * step, cx + dx * step, r, aspect)] = COLOURS[colour]
    texts = {
        "text": f"a {colour} {shape} moves {direction}",
        "question": "which way does the shape move?",
        "answer": direction,
    }
    return frames, texts


def order_clip(
    rng: np.random.Generator, *, num_frames: int = 24, size: int = 64
) -> tuple[np.ndarray, dict]:
    """Two different shapes that appear one after the other; both visible by frame f // 2."""
    first, second = (SHAPES[i] for i in rng.permutation(len(SHAPES))[:2])
    colour_a, colour_b = (list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:2])
    r = rng.uniform(0.12, 0.16) * size
    aspects = _aspect(rng), _aspect(rng)
    while True:  # two non-overlapping places
        centres = rng.uniform(r + 1, size - r - 1, size=(2, 2))
        if np.hypot(*(centres[0] - centres[1])) > 2.2 * r:
            break
    mid = num_frames // 2
    t_first = int(rng.integers(0, max(1, mid // 3)))
    t_second = int(rng.integers(t_first + 2, mid)) if mid > t_first + 2 else min(t_first + 1, mid)
    frames, yy, xx = _blank(num_frames, size)
    for shape, colour, (cy, cx), start, aspect in (
        (first, colour_a, centres[0], t_first, aspects[0]),
        (second, colour_b, centres[1], t_second, aspects[1]),
    ):
        frames[start:, _shape_mask(shape, yy, xx, cy, cx, r, aspect)] = COLOURS[colour]
    texts = {
        "text": f"a {colour_a} {first} appears, then a {colour_b} {second} appears",
        "question": "which shape appears first?",
        "answer": f"the {first}",
    }
    return frames, texts


_CLIPS = {"motion": motion_clip, "order": order_clip}


def make_dataset(
    out_dir: str | os.PathLike,
    *,
    n: int,
    seed: int,
    split: str = "train",
    num_frames: int = 24,
    size: int = 64,
    fps: int = 8,
    tasks: tuple[str, ...] = TASKS,
) -> list[dict]:
    """Write n clips to out_dir/split/ and the manifest out_dir/{split}.jsonl.

    Returns the records with "video" as a path under out_dir. Clip i is drawn from a generator
    seeded by (seed, split, i) and its task is tasks[i % len(tasks)].
    """
    unknown = [t for t in tasks if t not in _CLIPS]
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {unknown or tasks}; choose from {sorted(_CLIPS)}")
    if num_frames < 4:
        raise ValueError(f"num_frames must be >= 4, got {num_frames}")
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    split_key = zlib.crc32(split.encode())
    records, lines = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, split_key, i])
        frames, texts = _CLIPS[tasks[i % len(tasks)]](rng, num_frames=num_frames, size=size)
        relative = f"{split}/{i:06d}.mp4"
        write_mp4(out_dir / relative, frames, fps)
        lines.append(json.dumps({"video": relative, **texts}))
        records.append({"video": str(out_dir / relative), **texts})
    (out_dir / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    return records


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL manifest, with relative "video" paths resolved against its folder."""
    path = Path(path)
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            record["video"] = str(path.parent / record["video"])
            records.append(record)
    return records
