"""Audio input: read WAV/FLAC/OGG (anything libsndfile reads) as mono 16 kHz float tensors.

Reading goes through `soundfile` only (`torchaudio.load` needs torchcodec + FFmpeg);
resampling uses `torchaudio.functional.resample`. Every failure is an `AudioError` whose
message is one line naming the file and the problem. Silent audio is valid input.

Long audio is never truncated: `iter_audio_chunks` reads a file block by block, so memory is
bounded by the chunk, not the file, and the concatenated chunks equal `load_audio` (the
resampler sees a little context across chunk boundaries).

Notation: s = samples, c = channels.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16_000

# `torchaudio.functional.resample` defaults; its sinc kernel reaches
# lowpass_filter_width / (rolloff * min(sr_in, sr_out)) seconds to each side.
_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99
# WAV writers that stream (ffmpeg to a pipe...) leave a placeholder data size; not truncation.
_STREAMING_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}
_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


class AudioError(ValueError):
    """An audio file that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class AudioInfo:
    """What a file holds, read from its header."""

    path: str
    duration: float  # seconds
    sample_rate: int
    channels: int
    frames: int  # samples per channel
    format: str  # e.g. "WAV", "FLAC", "OGG"
    subtype: str  # e.g. "PCM_16", "VORBIS"


def _fail(path: str | os.PathLike, problem: str) -> AudioError:
    problem = " ".join(str(problem).split())  # one line
    return AudioError(f"{os.fspath(path)}: {problem}")


def _libsndfile_reason(err: Exception) -> str:
    """libsndfile's message without the "Error opening '<path>': " prefix."""
    msg = " ".join(str(err).split())
    return msg.split("': ", 1)[-1]


def _truncated_wav(handle: sf.SoundFile) -> bool:
    """A WAV whose header promises more data than the file holds (libsndfile reads the rest)."""
    match = _DATA_SIZE.search(handle.extra_info)
    if match is None:
        return False
    declared, actual = int(match.group(1)), int(match.group(2))
    return declared > actual and declared not in _STREAMING_SIZES


def _open(path: str | os.PathLike) -> sf.SoundFile:
    """Open for reading, turning every failure into an `AudioError`."""
    if not os.path.exists(path):
        raise _fail(path, "file not found")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise _fail(path, "empty file (0 bytes)")
    try:
        handle = sf.SoundFile(path)
    except sf.LibsndfileError as err:
        reason = _libsndfile_reason(err)
        if "not recognised" in reason.lower():
            reason = f"unsupported or unrecognised audio format ({reason})"
        else:
            reason = f"corrupt or truncated audio ({reason})"
        raise _fail(path, reason) from None
    except (OSError, RuntimeError) as err:
        raise _fail(path, f"cannot open ({err})") from None
    if handle.frames == 0:
        handle.close()
        raise _fail(path, "contains no audio samples (0 frames)")
    if handle.samplerate <= 0 or handle.channels <= 0:
        handle.close()
        raise _fail(path, f"invalid header ({handle.samplerate} Hz, {handle.channels} channels)")
    if _truncated_wav(handle):
        handle.close()
        raise _fail(path, "truncated file (header promises more audio data than the file holds)")
    return handle


def _read(handle: sf.SoundFile, path: str | os.PathLike, frames: int) -> np.ndarray:
    """Read `frames` frames as float32 (s, c); a short or failed read is an `AudioError`."""
    try:
        block = handle.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise _fail(path, f"corrupt or truncated audio ({_libsndfile_reason(err)})") from None
    # MP3 frame counts are estimates; elsewhere a short read means the data ends early.
    if block.shape[0] < frames and not handle.subtype.startswith("MPEG"):
        raise _fail(path, f"truncated file (read {block.shape[0]} of {frames} expected frames)")
    return block


def _to_mono(block: np.ndarray) -> torch.Tensor:
    """(s, c) float32 numpy -> (s,) float32 tensor, averaging channels."""
    mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1)
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))


def _check_rate(sample_rate: int) -> None:
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Header information of an audio file, without reading its samples."""
    with _open(path) as handle:
        return AudioInfo(
            path=os.fspath(path),
            duration=handle.frames / handle.samplerate,
            sample_rate=handle.samplerate,
            channels=handle.channels,
            frames=handle.frames,
            format=handle.format,
            subtype=handle.subtype,
        )


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read a whole file as a mono float32 waveform at `sample_rate`.

    Returns:
        (s,) float32 tensor, s = ceil(frames * sample_rate / file_rate), values in [-1, 1].
    """
    _check_rate(sample_rate)
    with _open(path) as handle:
        wave = _to_mono(_read(handle, path, handle.frames))  # (s_in,)
        file_rate = handle.samplerate
    if file_rate != sample_rate:
        wave = AF.resample(wave, file_rate, sample_rate)  # (s,)
    return wave


def iter_audio_chunks(
    path: str | os.PathLike,
    chunk_seconds: float = 60.0,
    sample_rate: int = SAMPLE_RATE,
) -> Iterator[torch.Tensor]:
    """Yield consecutive mono chunks of `chunk_seconds` at `sample_rate`, read block-wise.

    Memory is bounded by one chunk (plus a few samples of resampling context), so hour-long
    files work. Every chunk but the last has the same length, at most
    ceil(chunk_seconds * sample_rate) samples; `torch.cat(list(chunks))` equals
    `load_audio(path, sample_rate)` up to float rounding. Chunk k starts at
    k * len(first chunk) / sample_rate seconds.

    Yields:
        (s,) float32 tensors.
    """
    _check_rate(sample_rate)
    if not chunk_seconds > 0:
        raise ValueError(f"chunk_seconds must be > 0, got {chunk_seconds!r}")
    with _open(path) as handle:
        file_rate, total = handle.samplerate, handle.frames
        g = math.gcd(file_rate, sample_rate)
        step_in, step_out = file_rate // g, sample_rate // g  # resampling period, in / out
        # Chunks start on multiples of the resampling period so that output samples line up.
        periods = max(1, int(chunk_seconds * sample_rate) // step_out)
        chunk_in = periods * step_in
        if file_rate == sample_rate:
            context = 0
        else:
            reach = _LOWPASS_FILTER_WIDTH * file_rate / (_ROLLOFF * min(file_rate, sample_rate))
            context = math.ceil((reach + 1) / step_in) * step_in

        for start in range(0, total, chunk_in):
            stop = min(start + chunk_in, total)
            lo, hi = max(0, start - context), min(total, stop + context)
            handle.seek(lo)
            wave = _to_mono(_read(handle, path, hi - lo))  # (hi - lo,)
            if file_rate != sample_rate:
                wave = AF.resample(wave, file_rate, sample_rate)
                first = (start - lo) // step_in * step_out
                count = math.ceil((stop - start) * step_out / step_in)
                wave = wave[first : first + count]
            yield wave
