"""Frame sampling and decord-based video loading, on clips written here with PyAV."""

import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("decord")

from encoders.video_io import VideoError, load_video, sample_frame_indices, video_info  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def write_clip(
    path, num_frames, height, width, fps, *, gray=None, fmt=None, options=None,
    container_options=None,
):
    """Write an H.264 clip; frame t is flat gray `gray(t)` if given (yuv Y plane), else noise.

    Frames are fed as yuv420p arrays (no colour conversion), which keeps 8K clips quick.
    """
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", **(options or {})}
        plane = np.full((height * 3 // 2, width), 128, np.uint8)
        for t in range(num_frames):
            if gray is None:
                plane[:height] = rng.integers(16, 235, (height, width), dtype=np.uint8)
            else:
                plane[:height] = gray(t)
            for packet in stream.encode(av.VideoFrame.from_ndarray(plane, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def gray_level(y):
    """RGB gray value that video Y level y (limited range) decodes to."""
    return (y - 16) * 255 / 219


# --- sample_frame_indices -------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [0, 1, 5, 63, 64])
def test_sample_all_frames_when_fewer_than_max(num_frames):
    assert sample_frame_indices(num_frames, 64) == list(range(num_frames))


def test_sample_exact_multiple_takes_segment_centres():
    assert sample_frame_indices(128, 64) == list(range(1, 128, 2))
    assert sample_frame_indices(12, 4) == [1, 4, 7, 10]


@pytest.mark.parametrize(
    "num_frames,max_frames",
    [(65, 64), (100, 64), (1000, 64), (7200, 64), (172_800, 64), (999_983, 32), (33, 32), (10, 1)],
)
def test_sample_is_uniform_monotone_and_in_range(num_frames, max_frames):
    idx = sample_frame_indices(num_frames, max_frames)
    assert len(idx) == max_frames
    assert all(0 <= i < num_frames for i in idx)
    assert all(a < b for a, b in zip(idx, idx[1:]))
    seg = Fraction(num_frames, max_frames)
    for k, i in enumerate(idx):  # frame i spans [i, i + 1) and holds the centre of segment k
        assert i <= (k + Fraction(1, 2)) * seg < i + 1


def test_sample_rejects_bad_arguments():
    with pytest.raises(ValueError):
        sample_frame_indices(-1, 8)
    with pytest.raises(ValueError):
        sample_frame_indices(10, 0)


# --- load_video ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_frames,height,width,fps,max_frames,fmt",
    [
        (10, 32, 48, 1, 64, None),
        (100, 64, 64, 10, 64, None),
        (64, 48, 80, 30, 64, None),
        (65, 64, 32, Fraction(30000, 1001), 16, None),
        (30, 36, 64, 25, 8, "matroska"),
        (1, 16, 16, 5, 64, None),
    ],
)
def test_load_video_shapes(tmp_path, num_frames, height, width, fps, max_frames, fmt):
    name = "c.mkv" if fmt else "c.mp4"
    path = write_clip(tmp_path / name, num_frames, height, width, fps, fmt=fmt)
    video = load_video(path, max_frames=max_frames)
    assert video.dtype == torch.uint8
    assert tuple(video.shape) == (min(num_frames, max_frames), 3, height, width)
    info = video_info(path)
    assert (info.num_frames, info.height, info.width) == (num_frames, height, width)
    assert info.fps == pytest.approx(float(fps), rel=1e-3)
    assert info.duration_s == pytest.approx(num_frames / float(fps), rel=1e-3)


def test_load_video_resizes_at_decode(tmp_path):
    path = write_clip(tmp_path / "c.mp4", 12, 48, 80, 8)
    assert tuple(load_video(path, size=(32, 40)).shape) == (12, 3, 32, 40)
    assert tuple(load_video(path, size=24).shape) == (12, 3, 24, 40)  # shorter side -> 24
    tall = write_clip(tmp_path / "t.mp4", 3, 80, 48, 8)
    assert tuple(load_video(tall, size=24, max_frames=2).shape) == (2, 3, 40, 24)


@pytest.mark.parametrize(
    "width,size", [(32, None), (48, None), (16, None), (64, (32, 72)), (64, (32, 24))]
)
def test_load_video_returns_the_sampled_frames(tmp_path, width, size):
    # Frame t is flat gray 20 + 3t; a long GOP with B-frames makes seeking non-trivial.
    # Output widths 16, 24, 48 and 72 hit decord's row-padding bug (see video_io).
    gop = {"g": "300", "bf": "3"}
    path = write_clip(tmp_path / "c.mp4", 70, 32, width, 10, gray=lambda t: 20 + 3 * t, options=gop)
    video = load_video(path, max_frames=16, size=size)
    assert tuple(video.shape) == (16, 3, 32, size[1] if size else width)
    # Reference levels: every frame, decoded in order at the same size (no seeking).
    levels = load_video(path, max_frames=70, size=size).float().mean(dim=(1, 2, 3)).numpy()
    if size is None:
        assert np.allclose(levels, gray_level(20 + 3 * np.arange(70)), atol=1.5)
    means = video.float().mean(dim=(1, 2, 3)).numpy()
    decoded = np.abs(means[:, None] - levels[None, :]).argmin(axis=1)
    assert decoded.tolist() == sample_frame_indices(70, 16)


def test_two_hour_video_is_sampled_quickly(tmp_path):
    # 2 h at 1 fps (7200 frames, 250-frame GOPs): a brightness ramp over the whole video.
    n = 2 * 3600
    path = write_clip(tmp_path / "long.mp4", n, 32, 32, 1, gray=lambda t: 16 + 219 * t // n)
    start = time.perf_counter()
    video = load_video(path, max_frames=64)
    elapsed = time.perf_counter() - start
    assert tuple(video.shape) == (64, 3, 32, 32)
    means = video.float().mean(dim=(1, 2, 3))
    assert (means[1:] >= means[:-1] - 1).all() and means[-1] - means[0] > 150
    assert video_info(path).duration_s == pytest.approx(7200, rel=1e-3)
    assert elapsed < 10, f"sampling 64 frames of a 2 h video took {elapsed:.1f}s"


@pytest.mark.slow
def test_two_hour_video_at_24_fps(tmp_path):
    n = 2 * 3600 * 24
    path = write_clip(tmp_path / "long24.mp4", n, 32, 32, 24, gray=lambda t: 16 + 219 * t // n)
    start = time.perf_counter()
    video = load_video(path, max_frames=64)
    assert time.perf_counter() - start < 20
    assert tuple(video.shape) == (64, 3, 32, 32)
    means = video.float().mean(dim=(1, 2, 3))
    assert (means[1:] >= means[:-1] - 1).all() and means[-1] - means[0] > 150


def test_8k_video_resized_at_decode(tmp_path):
    path = write_clip(tmp_path / "8k.mp4", 2, 4320, 7680, 2, gray=lambda t: 60 + 100 * t)
    assert tuple(load_video(path, size=(90, 160)).shape) == (2, 3, 90, 160)
    assert tuple(load_video(path, size=224, max_frames=1).shape) == (1, 3, 224, 398)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_8k_video_memory_is_bounded_by_output_size(tmp_path):
    num_frames = 12
    path = write_clip(tmp_path / "8k.mp4", num_frames, 4320, 7680, 4, gray=lambda t: 30 + 15 * t)
    full_frames_mb = num_frames * 4320 * 7680 * 3 / 2**20  # ~1.2 GB if frames were kept
    code = (
        # VmHWM (peak RSS) starts afresh at exec; ru_maxrss would inherit this process's peak.
        "from encoders.video_io import load_video\n"
        "def kb(key):\n"
        "    line = next(x for x in open('/proc/self/status') if x.startswith(key))\n"
        "    return int(line.split()[1])\n"
        "before = kb('VmRSS')\n"
        f"v = load_video({str(path)!r}, size=(224, 224))\n"
        f"assert tuple(v.shape) == ({num_frames}, 3, 224, 224)\n"
        "print((kb('VmHWM') - before) / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    grown_mb = float(out.stdout.strip().splitlines()[-1])
    assert grown_mb < full_frames_mb / 3, f"peak memory grew {grown_mb:.0f} MB"


# --- errors -----------------------------------------------------------------------------------


def assert_video_error(path, match, readers=(load_video, video_info)):
    for read in readers:
        with pytest.raises(VideoError) as info:
            read(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message
        assert match in message, message
        assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path):
    assert_video_error(tmp_path / "nope.mp4", "not found")


def test_directory_and_empty_file(tmp_path):
    assert_video_error(tmp_path, "not a regular file")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert_video_error(empty, "empty")


def test_corrupt_bytes(tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert_video_error(path, "corrupt")


@pytest.mark.parametrize("container_options", [{}, {"movflags": "+faststart"}])
def test_truncated_mp4(tmp_path, container_options):
    # Index (moov) at the end: it is cut off. With faststart the index survives but the data ends.
    full = write_clip(tmp_path / "full.mp4", 30, 64, 64, 10, container_options=container_options)
    data = full.read_bytes()
    path = tmp_path / "half.mp4"
    path.write_bytes(data[: len(data) // 2])
    assert_video_error(path, "truncated")


def test_garbled_video_data(tmp_path):
    faststart = {"movflags": "+faststart"}
    full = write_clip(tmp_path / "full.mp4", 30, 64, 64, 10, container_options=faststart)
    data = bytearray(full.read_bytes())
    third = len(data) // 3
    noise = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8)
    data[third:third + 20000] = noise.tobytes()
    path = tmp_path / "garbled.mp4"
    path.write_bytes(bytes(data))
    assert_video_error(path, "corrupt", readers=(load_video,))  # the first frame is intact


@pytest.mark.parametrize(
    "name,with_audio,match",
    [
        ("zero.mkv", True, "zero frames"),  # a video track without a single frame
        ("zero.webm", True, "zero frames"),
        ("zero-only.mkv", False, "ends before any video data"),  # headers, then nothing
        ("zero.mp4", True, "no video stream"),  # mp4 drops a track with no samples
        ("zero-only.mp4", False, "no video stream"),
    ],
)
def test_zero_frame_files(tmp_path, name, with_audio, match):
    path = tmp_path / name
    webm = name.endswith(".webm")
    if webm and not {"libvpx-vp9", "libopus"} <= set(av.codecs_available):
        pytest.skip("this PyAV build has no VP9/Opus encoder")
    with av.open(str(path), "w", format="matroska" if name.endswith(".mkv") else None) as container:
        stream = container.add_stream("libvpx-vp9" if webm else "libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        if with_audio:
            audio = container.add_stream("libopus" if webm else "aac", rate=48000)
            audio.layout = "mono"
            silence = np.zeros((1, 4800), np.float32)
            frame = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
            frame.sample_rate = 48000
            for packet in list(audio.encode(frame)) + list(audio.encode()):
                container.mux(packet)
        container.start_encoding()
    assert_video_error(path, match)


@pytest.mark.parametrize(
    "name,codec", [("speech.m4a", "aac"), ("speech.wav", "pcm_s16le"), ("speech.mov", "pcm_s16le")]
)
def test_audio_only_file(tmp_path, name, codec):
    path = tmp_path / name
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=16000)
        stream.layout = "mono"
        wave = np.sin(np.arange(16000) / 10)[None]  # (1, samples)
        if codec == "aac":
            samples = wave.astype(np.float32)
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        else:
            pcm = (wave * 8000).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    assert_video_error(path, "no video stream")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    path = write_clip(tmp_path / "c.mp4", 4, 16, 16, 4)
    path.chmod(0)
    assert_video_error(path, "not readable")
