"""Audio input: formats, resampling, mono mixdown, chunked reading, one-line errors."""

import math
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch

from encoders.audio import AudioError, audio_info, iter_audio_chunks, load_audio


def tone(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: torch.Tensor, sr: int = 16_000) -> float:
    spectrum = torch.fft.rfft(wave).abs()
    return float(spectrum.argmax()) * sr / wave.shape[0]


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg"])
def test_formats_load_as_mono_16k(tmp_path, ext):
    path = tmp_path / f"tone.{ext}"
    sf.write(path, tone(1.0, 16_000), 16_000)
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.shape == (16_000,)
    assert abs(peak_hz(wave) - 440.0) < 2.0


@pytest.mark.parametrize("sr", [8_000, 22_050, 48_000])
def test_resampled_to_right_length_and_pitch(tmp_path, sr):
    path = tmp_path / "tone.wav"
    sf.write(path, tone(2.0, sr), sr)
    wave = load_audio(path)
    assert wave.shape == (32_000,)
    assert abs(peak_hz(wave) - 440.0) < 1.0
    assert load_audio(path, sample_rate=8_000).shape == (16_000,)


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(0.5, 16_000), tone(0.5, 16_000, freq=1000.0, amp=0.25)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16_000, subtype="FLOAT")
    torch.testing.assert_close(load_audio(path), torch.from_numpy((left + right) / 2))
    info = audio_info(path)
    assert (info.channels, info.sample_rate, info.frames) == (2, 16_000, 8_000)
    assert info.duration == pytest.approx(0.5) and info.format == "WAV"


def test_silence_is_valid_input(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(4_000, np.float32), 16_000)
    wave = load_audio(path)
    assert wave.shape == (4_000,) and not wave.any()


def _write_bad(tmp_path, kind):
    good = tmp_path / "good.wav"
    sf.write(good, tone(1.0, 16_000), 16_000)
    if kind == "missing":
        return tmp_path / "nope.wav"
    if kind == "directory":
        return tmp_path
    path = tmp_path / f"{kind}.wav"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "zero_frames":
        sf.write(path, np.zeros(0, np.float32), 16_000)
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4_096, dtype=np.uint8).tobytes())
    elif kind == "text_renamed":
        path.write_text("this is not audio\n" * 50)
    elif kind == "truncated_wav":
        path.write_bytes(good.read_bytes()[:20_000])
    elif kind == "truncated_flac":
        flac = tmp_path / "good.flac"
        sf.write(flac, np.random.default_rng(0).uniform(-0.5, 0.5, 32_000).astype(np.float32), 16_000)
        path = tmp_path / "truncated.flac"
        path.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    return path


BAD = {
    "missing": "not found",
    "directory": "directory",
    "empty": "empty",
    "zero_frames": "no audio",
    "random_bytes": "unsupported",
    "text_renamed": "unsupported",
    "truncated_wav": "truncated",
    "truncated_flac": "truncated",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_inputs_raise_one_line_audio_error(tmp_path, kind):
    path = _write_bad(tmp_path, kind)
    for read in (load_audio, lambda p: list(iter_audio_chunks(p, chunk_seconds=0.25))):
        with pytest.raises(AudioError) as info:
            read(path)
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert "\n" not in message and str(path) in message and BAD[kind] in message.lower()


@pytest.mark.parametrize("sr,channels", [(16_000, 1), (8_000, 2), (44_100, 1)])
def test_chunks_concatenate_to_whole_file(tmp_path, sr, channels):
    rng = np.random.default_rng(sr)
    path = tmp_path / "noise.wav"
    sf.write(path, rng.uniform(-0.5, 0.5, (int(3.3 * sr), channels)).astype(np.float32), sr, subtype="FLOAT")
    chunks = list(iter_audio_chunks(path, chunk_seconds=0.7))
    assert len(chunks) == math.ceil(3.3 / 0.7)
    assert len({c.shape[0] for c in chunks[:-1]}) == 1 and chunks[0].shape[0] <= 0.7 * 16_000
    torch.testing.assert_close(torch.cat(chunks), load_audio(path), atol=1e-5, rtol=0)


def test_ten_minute_file_is_read_with_bounded_memory(tmp_path):
    sr, seconds, chunk_seconds = 16_000, 600, 20.0
    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, subtype="PCM_16") as out:
        for minute in range(seconds // 60):  # silence + tone, written block-wise
            block = np.zeros(60 * sr, np.float32)
            block[: 5 * sr] = tone(5.0, sr, freq=300.0 + 50 * minute)
            out.write(block)
    assert audio_info(path).duration == pytest.approx(seconds)

    chunk_samples = int(chunk_seconds * sr)
    tracemalloc.start()  # numpy buffers from soundfile are traced
    total, peak_chunk = 0, 0
    for chunk in iter_audio_chunks(path, chunk_seconds=chunk_seconds):
        total += chunk.shape[0]
        peak_chunk = max(peak_chunk, chunk.shape[0])
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == seconds * sr
    assert peak_chunk == chunk_samples
    whole_file_bytes = seconds * sr * 4
    assert peak_bytes < 4 * chunk_samples * 4 < whole_file_bytes / 5
