"""Video decoding: uniformly sample up to F frames of a file with decord.

Notation: f = sampled frames (<= max_frames), H, W = output frame height and width.

Memory is bounded by F and the output size, never by the file: decord builds a packet index
(no decoding), `get_batch` seeks to each sampled index and decodes only from the nearest key
frame, and when `size` is given frames are resized inside decord's decode pipeline, so no
full-resolution frame is ever collected (an 8K clip costs a few decoder buffers; an int size
decodes one full-resolution frame first, to read the aspect ratio).

Every failure is a `VideoError` (a `ValueError`) whose single-line message names the file.
When decord cannot open a file, PyAV (if installed) probes its headers to name the problem.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["VideoError", "VideoInfo", "sample_frame_indices", "video_info", "load_video"]

DEFAULT_MAX_FRAMES = 64  # Llama 3: up to 64 frames sampled uniformly per video


class VideoError(ValueError):
    """A video file cannot be read; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container reports: frame count, average fps, duration, frame size."""

    num_frames: int
    fps: float
    duration_s: float
    height: int
    width: int


def sample_frame_indices(num_frames: int, max_frames: int = DEFAULT_MAX_FRAMES) -> list[int]:
    """Indices of up to `max_frames` frames spread uniformly over `num_frames`.

    The video is cut into `max_frames` equal segments and the frame at the centre of each is
    taken; a video with at most `max_frames` frames gives all of them. The result is strictly
    increasing and within [0, num_frames).
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if num_frames <= max_frames:
        return list(range(num_frames))
    # Integer arithmetic: centre of segment i is (2i + 1) * num_frames / (2 * max_frames).
    return [(2 * i + 1) * num_frames // (2 * max_frames) for i in range(max_frames)]


def video_info(path: str | os.PathLike, *, num_threads: int = 1) -> VideoInfo:
    """Frame count, fps, duration and frame size of a video; decodes only its first frame."""
    path = _checked_path(path)
    reader = _open(path, num_threads=num_threads)
    num_frames, fps = len(reader), float(reader.get_avg_fps())
    try:
        height, width = reader.next().shape[:2]  # (H, W, c); c may be wrong, see _read
    except Exception as err:
        raise VideoError(f"{path}: {_explain(err)}") from err
    return VideoInfo(
        num_frames=num_frames,
        fps=fps,
        duration_s=num_frames / fps if fps > 0 else 0.0,
        height=int(height),
        width=int(width),
    )


def load_video(
    path: str | os.PathLike,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    size: int | tuple[int, int] | None = None,
    num_threads: int = 1,
) -> torch.Tensor:
    """Decode up to `max_frames` uniformly sampled frames as a uint8 tensor (f, 3, H, W).

    size: None keeps the file's resolution; (height, width) resizes to exactly that; an int
        resizes the shorter side to it, keeping the aspect ratio (like torchvision's Resize).
        Resizing happens at decode time, so memory does not grow with the file's resolution.
    num_threads: decoder threads per file (0 = decord's automatic choice). One thread suits
        many small clips decoded in parallel workers; each extra thread holds extra
        full-resolution frames in flight.
    """
    path = _checked_path(path)
    height, width = _output_size(path, size, num_threads)
    reader = _open(path, height=height, width=width, num_threads=num_threads)
    indices = sample_frame_indices(len(reader), max_frames)
    return _read(path, reader, indices)


def _checked_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(f"{path}: video file not found")
    if not os.path.isfile(path):
        raise VideoError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise VideoError(f"{path}: video file is not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: video file is empty (0 bytes)")
    return path


def _output_size(
    path: str, size: int | tuple[int, int] | None, num_threads: int
) -> tuple[int, int]:
    """(height, width) to ask decord for; -1 keeps the file's own size."""
    if size is None:
        return -1, -1
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        info = video_info(path, num_threads=num_threads)
        short, long = sorted((info.height, info.width))
        other = max(1, round(size * long / short))
        return (size, other) if info.height <= info.width else (other, size)
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(height), int(width)


def _open(path: str, *, height: int = -1, width: int = -1, num_threads: int = 1):
    import decord  # imported lazily: only video reading needs it

    try:
        reader = decord.VideoReader(
            path, ctx=decord.cpu(0), width=width, height=height, num_threads=num_threads
        )
    except Exception as err:  # decord raises RuntimeError, DECORDError or AssertionError
        raise VideoError(f"{path}: {_diagnose(path) or _explain(err)}") from err
    if len(reader) <= 0:
        raise VideoError(f"{path}: video stream has zero frames")
    return reader


def _read(path: str, reader, indices: list[int]) -> torch.Tensor:
    """Decode the given frame indices with one get_batch; returns uint8 (f, 3, H, W)."""
    try:
        frames = reader.get_batch(indices).asnumpy()  # (f, H, W, 3)
    except Exception as err:
        if not _is_row_padding_bug(err):
            raise VideoError(f"{path}: {_explain(err)}") from err
        frames = _read_one_by_one(path, reader, indices)  # (f, H, W, 3)
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[3] != 3:
        raise VideoError(
            f"{path}: decoder returned frames of shape {tuple(frames.shape)} "
            f"for {len(indices)} requested frames"
        )
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # (f, 3, H, W)


def _is_row_padding_bug(err: BaseException) -> bool:
    """decord 0.6.0 bug: for some output widths (16, 24, 48, 72... depending on FFmpeg's row
    alignment) a padded RGB row of L bytes with L % W == 0 is taken for a compact (H, W, L/W)
    frame, and get_batch fails to copy it into its (H, W, 3) slot."""
    return "size must exactly match" in str(err)


def _read_one_by_one(path: str, reader, indices: list[int]) -> np.ndarray:
    """Workaround for the row-padding bug: seek + next per frame, then drop each row's padding.

    next() hands back the (H, W, c) view of the padded rows (c * W bytes each, c > 3); the
    first 3 * W bytes of every row are the pixels. Exact pixels, no extra resampling.
    """
    frames = []
    try:
        for index in indices:
            reader.seek_accurate(index)
            frame = reader.next().asnumpy()  # (H, W, c)
            height, width, c = frame.shape
            rows = frame.reshape(height, width * c)[:, : width * 3]  # (H, 3W), padding dropped
            frames.append(rows.reshape(height, width, 3))
    except Exception as err:
        raise VideoError(f"{path}: {_explain(err)}") from err
    return np.stack(frames)  # (f, H, W, 3)


# decord's error text (first match wins) -> what went wrong, in words a user can act on.
_PROBLEMS = [
    ("cannot find video stream", "no video stream (audio-only or empty container)"),
    ("Invalid frame count", "video stream has zero frames"),
    ("Cannot create buffer source", "video stream has no decodable frames (zero-frame file?)"),
    ("Error reading", "cannot open as a video (corrupt, truncated or not a video file)"),
    ("av_read_frame failed", "truncated or corrupt file (stream ends early)"),
    ("Error sending packet", "corrupt video data (decoding failed)"),
    ("Permission denied", "video file is not readable (permission denied)"),
    ("Out of bound", "file reports more frames than it holds (corrupt or truncated)"),
]


def _diagnose(path: str) -> str | None:
    """Why decord cannot open `path`, from the container's headers (PyAV, if installed).

    decord's exception only says "Error reading" when FFmpeg cannot open a file (the reason
    goes to stderr), so the container is probed again to name the problem. Runs on failure
    only; returns None when PyAV is missing or sees nothing wrong.
    """
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(path) as container:
            streams = container.streams
            if not streams.video:
                return "no video stream (audio-only file)" if streams.audio else "no video stream"
            for packet in container.demux(streams.video[0]):
                if packet.size:
                    return None
            return "video stream has zero frames"
    except EOFError:
        return "file ends before any video data (zero-frame or truncated file)"
    except Exception:  # av.error.FFmpegError and friends
        return "corrupt, truncated or not a video file (cannot parse the container)"


def _explain(err: BaseException) -> str:
    if isinstance(err, StopIteration):
        return "video stream has no decodable frames"
    text = str(err)
    for needle, problem in _PROBLEMS:
        if needle in text:
            return problem
    return f"cannot decode video ({_one_line(text) or type(err).__name__})"


def _one_line(text: str, limit: int = 160) -> str:
    """Strip decord's '[hh:mm:ss] /src/file.cc:123:' prefixes and collapse to one short line."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\]\s*\S+:\d+:\s*", "", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
