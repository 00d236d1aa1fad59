"""Synthetic speech from eSpeak NG (espeakng-loader, no system install)."""

import threading

import numpy as np
import pytest

from mm.sources.espeak import EVAL_VOICES, TRAIN_VOICES, VOICES, sample_rate, synthesize

TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.mark.parametrize("voice", ["en+m1", "en-us+f2"])
def test_speech_is_non_silent_with_plausible_duration(voice):
    wave, sr = synthesize(TEXT, voice=voice)
    assert sr == 22_050 == sample_rate()
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert np.abs(wave).max() <= 1.0 and np.sqrt(np.mean(wave**2)) > 0.02
    assert 1.5 < len(wave) / sr < 5.0  # nine words at 175 words per minute


def test_voices_rate_and_pitch_change_the_audio():
    base, _ = synthesize(TEXT, voice="en+m1")
    other, _ = synthesize(TEXT, voice="en+f3")
    assert len(base) != len(other) or not np.allclose(base, other)
    fast, _ = synthesize(TEXT, voice="en+m1", rate=320)
    slow, _ = synthesize(TEXT, voice="en+m1", rate=110)
    assert len(fast) < len(base) < len(slow)
    high, _ = synthesize(TEXT, voice="en+m1", pitch=90)
    assert not np.array_equal(high, base)
    # eSpeak keeps generator state (pitch flutter, libc rand) across calls: a repeat is
    # close but not bit-identical.
    again, _ = synthesize(TEXT, voice="en+m1")
    assert abs(len(again) - len(base)) < 0.01 * len(base)


def test_voice_lists():
    assert not set(TRAIN_VOICES) & set(EVAL_VOICES)
    assert set(VOICES) == set(TRAIN_VOICES) | set(EVAL_VOICES)
    train_variants = {v.split("+")[1] for v in TRAIN_VOICES}
    assert not train_variants & {v.split("+")[1] for v in EVAL_VOICES}  # unseen speakers
    for voice in VOICES:
        assert synthesize("yes", voice=voice)[0].size > 0


def test_bad_requests():
    with pytest.raises(ValueError, match="unknown eSpeak voice"):
        synthesize("hello", voice="xx+nobody")
    with pytest.raises(ValueError, match="non-blank"):
        synthesize("   ")
    with pytest.raises(ValueError, match="rate"):
        synthesize("hello", rate=10)


def test_threads_get_the_same_audio_as_serial_up_to_espeak_jitter():
    texts = [f"sentence number {i}" for i in range(8)]
    serial = [synthesize(t, voice=VOICES[i % 4])[0] for i, t in enumerate(texts)]
    results = [None] * len(texts)

    def work(i):
        results[i] = synthesize(texts[i], voice=VOICES[i % 4])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, results):
        assert abs(len(a) - len(b)) < 0.02 * len(a)
        assert np.sqrt(np.mean(b**2)) == pytest.approx(np.sqrt(np.mean(a**2)), rel=0.1)


def test_the_same_requests_give_the_same_audio_in_every_run():
    # eSpeak seeds its noise from the clock; each utterance now seeds it from the request, so
    # two processes speaking the same sequence get the same samples (the demo's data)
    import subprocess
    import sys
    import time
    from pathlib import Path
    # (each process first moves the C library's generator, as other code in a process may;
    # and the runs start over a second apart, so the clock's seeds differ)
    code = ("import ctypes, hashlib, os; from mm.sources.espeak import synthesize; h = hashlib.sha1()\n"
            "ctypes.CDLL(None).srand(os.getpid())\n"
            "for i, v in enumerate(['en+f3', 'en+f2', 'en-us+m7']):  # f2, f3: voices with breath noise\n"
            "    h.update(synthesize(f'my friend lives in Ghana {i}', voice=v, rate=170 + i)[0].tobytes())\n"
            "print(h.hexdigest())")
    root = Path(__file__).resolve().parents[2]
    runs = []
    for k in range(2):
        if k:
            time.sleep(1.1)
        runs.append(subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                                   timeout=120))
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-500:]
    assert runs[0].stdout.strip() == runs[1].stdout.strip() != ""


def test_phonemes_follow_the_voice_language_and_are_known():
    from mm.sources.espeak import ENGLISH_PHONEMES, phonemes

    uk, us = phonemes("What is the capital of Thailand?", "en+m1"), phonemes("What is the capital of Thailand?", "en-us+f3")
    assert uk[-6:] == us[-6:] == ("t", "aI", "l", "@", "n", "d")  # no stress marks, no word breaks
    assert uk != us and "t#" in us and "t#" not in uk  # the American flap in "capital"
    assert phonemes("What is the capital of Thailand?", "en+f2") == uk  # the variant does not matter
    words = "the quick brown fox jumps over the lazy dog while seven zebras whistle a cheerful tune"
    assert set(phonemes(words, "en")) | set(phonemes(words, "en-us")) <= set(ENGLISH_PHONEMES)
    assert phonemes("Hello, world.", "en-us") == ("h", "@", "l", "oU", "w", "3:", "l", "d")  # every clause
    # the pauses eSpeak puts inside a long clause ("d0g__:__: and") are not phonemes
    long = "the quick brown fox jumped over the lazy dog and went home to sleep for a very long time"
    assert set(phonemes(long, "en-us")) <= set(ENGLISH_PHONEMES) and ":" not in phonemes(long, "en")
    with pytest.raises(ValueError, match="unknown eSpeak voice"):
        phonemes("hello", "xx+nothing")
