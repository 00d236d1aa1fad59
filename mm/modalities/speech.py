"""The speech modality: log-mel features -> Conformer encoder -> speech adapter, whose outputs
enter the frozen LLM as token embeddings between two trainable boundary embeddings.

Manifest records name their file under the key of the model's speech modality. The library's
configs call that modality ``audio`` (``model.modalities.audio: {type: speech, ...}``), so a
manifest line is ``{"audio": "a.wav", "text": "...", "task": "asr" | "qa"}``.

Prompts (Llama 3): ASR ``"Repeat after me in {language}:"``, translation ``"Translate the
following sentence into {language}:"``, spoken dialogue (``task: qa``): no task prompt.

Also registers two training objectives: ``best_rq`` (self-supervised encoder pre-training)
and ``speech_lm`` (the ``lm`` objective plus an optional CTC alignment loss that speeds up
CPU-sized runs; with its weights at 0 it is exactly ``lm``).

Notation: b=batch, n=fbank frames (10 ms), m=encoder frames (40 ms), m2=adapter frames
(80 ms), f=mel bins (80).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from adapters.speech import speech_adapter, speech_adapter_llama3, speech_adapter_tiny
from encoders.audio import SAMPLE_RATE, AudioInfo, audio_info, load_audio
from encoders.best_rq import best_rq
from encoders.speech import speech_encoder, speech_encoder_llama3, speech_encoder_tiny
from encoders.speech_features import num_stacked_frames
from mm.modality import Modality
from mm.modalities.base import LLMShape, ModalityType

log = logging.getLogger("mm")

WINDOW_SECONDS = 60.0  # longest segment the model takes at once (Llama 3: 60 s, 750 positions)
ASR_PROMPT = "Repeat after me in {language}:\n"  # the speech follows on a line of its own
TRANSLATE_PROMPT = "Translate the following sentence into {language}:\n"
SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au")

ENCODERS = {"tiny": speech_encoder_tiny, "llama3": speech_encoder_llama3, "custom": speech_encoder}
ADAPTERS = {"tiny": speech_adapter_tiny, "llama3": speech_adapter_llama3, "custom": speech_adapter}


class SpeechInputError(ValueError):
    """An audio input that cannot be used; one line naming the file."""


def _preset(table: dict, preset: str, what: str):
    if preset not in table:
        raise ValueError(f"unknown speech {what} preset {preset!r}; choose one of {', '.join(table)}")
    return table[preset]


def build(llm: LLMShape, *, encoder: dict | None = None, adapter: dict | None = None,
          readout: dict | None = None, boundary_init: str | list[str] | None = None) -> Modality:
    """Speech encoder + adapter sized by presets (``tiny``, ``llama3``) or explicit sizes
    (``preset: custom`` with the builder's keyword arguments).

    ``readout: {blank: " "}`` (or ``{blank_id: N}``): the adapter's frames enter the LLM read
    out as its own tokens, blanks moved last (:func:`mm.modality.vocabulary_readout`); off by
    default (the Llama 3 recipe feeds the frames as they are). ``readout: {..., blanks:
    keep | drop | prompted}``: which utterances the LLM sees with their blank frames (default
    ``keep``, all; ``prompted``: those that come with text in the user's turn, such as ASR's
    prompt, while a spoken question on its own is read as its tokens only; see
    :class:`mm.modality.Modality`).

    ``boundary_init``: the two new boundary embeddings (begin, end of speech) start as copies
    of these one-token texts' input embeddings (one text for both, or a list of two), e.g.
    ``"\n"``: the speech then reads like a line of its own. They are new parameters either
    way (no vocabulary row changes) and train like any other; default: small random values."""
    enc = dict(encoder or {})
    e = _preset(ENCODERS, enc.pop("preset", "tiny"), "encoder")(**enc)
    ad = dict(adapter or {})
    a = _preset(ADAPTERS, ad.pop("preset", "tiny"), "adapter")(encoder_dim=e.dim, llm_dim=llm.dim, **ad)
    readout = dict(readout or {})
    blanks = readout.pop("blanks", "keep")
    mod = Modality(kind="tokens", encoder=e, adapter=a, llm_dim=llm.dim, readout_blank=_readout_blank(llm, readout),
                   readout_blanks=blanks)
    if boundary_init is not None:
        with torch.no_grad():
            mod.boundary.copy_(_boundary_rows(llm, boundary_init))
    return mod


def _boundary_rows(llm: LLMShape, texts: str | list[str]) -> torch.Tensor:
    """(2, d) input embeddings of ``texts`` (one text for both rows, or two)."""
    texts = [texts, texts] if isinstance(texts, str) else list(texts)
    if len(texts) != 2:
        raise ValueError(f"boundary_init takes one text or a list of two, got {len(texts)}")
    if llm.token_ids is None or llm.token_embedding is None:
        raise ValueError("boundary_init needs the LLM's tokenizer and input embeddings")
    return torch.stack([llm.token_embedding(_one_token(llm.token_ids(t), f"boundary_init {t!r}")) for t in texts])


def _readout_blank(llm: LLMShape, readout: dict | None) -> int | None:
    if not readout:
        return None
    unknown = set(readout) - {"blank", "blank_id"}
    if unknown or len(readout) != 1:
        raise ValueError(f"readout takes one of blank (text) or blank_id (token id), and optionally blanks, "
                         f"got {sorted(readout)}")
    if "blank_id" in readout:
        return int(readout["blank_id"])
    if llm.token_ids is None:
        raise ValueError("readout: {blank: ...} needs the LLM's tokenizer; give blank_id instead")
    return _one_token(llm.token_ids(str(readout["blank"])), f"readout blank {readout['blank']!r}")


def _one_token(ids: list[int], what: str) -> int:
    """The id of a text that must be a single token of the LLM's vocabulary."""
    if len(ids) != 1:
        raise ValueError(f"{what} must be one token of the LLM's vocabulary, got {len(ids)}")
    return ids[0]


@dataclass(frozen=True)
class AudioClip:
    """A checked, not yet decoded audio file (its header was read, its samples were not)."""

    path: str
    info: AudioInfo


def read(path: Path) -> AudioClip:
    """Check the file's header (format, truncation, 0 frames); samples are read by
    :func:`preprocess`, so an over-long file is refused without loading it."""
    return AudioClip(str(path), audio_info(path))


def waveform(raw, *, max_seconds: float = WINDOW_SECONDS) -> torch.Tensor:
    """(s,) float32 16 kHz mono from an :class:`AudioClip` or a 16 kHz waveform."""
    if isinstance(raw, AudioClip):
        if raw.info.duration > max_seconds + 1e-6:
            raise SpeechInputError(f"{raw.path}: {raw.info.duration:.1f} s is longer than the {max_seconds:g} s "
                                   "window (mm transcribe chunks long audio)")
        return load_audio(raw.path)
    wave = torch.as_tensor(raw, dtype=torch.float32)
    if wave.dim() != 1:
        raise SpeechInputError(f"waveform must be 1-D (samples,), got shape {tuple(wave.shape)}")
    if wave.shape[0] > max_seconds * SAMPLE_RATE + 1:
        raise SpeechInputError(f"waveform of {wave.shape[0] / SAMPLE_RATE:.1f} s is longer than the "
                               f"{max_seconds:g} s window")
    return wave


class single_thread:
    """Run small per-item tensor ops on one thread: several times faster than two threads
    for one utterance's features, and much faster on a busy machine (no thread contention)."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def preprocess(raw, modality: Modality, *, max_seconds: float = WINDOW_SECONDS) -> dict:
    """Audio -> normalised log-mel features ``{"features": (n, f), "lengths": ()}``."""
    with single_thread():
        wave = waveform(raw, max_seconds=max_seconds)
        feats, lengths = modality.encoder.featurize([wave])  # (1, n, f), (1,)
    if int(lengths[0]) == 0:
        where = raw.path if isinstance(raw, AudioClip) else "waveform"
        raise SpeechInputError(f"{where}: too short ({wave.shape[0] / SAMPLE_RATE * 1000:.0f} ms; need 25 ms)")
    return {"features": feats[0], "lengths": lengths[0]}


def collate(items: list[dict]) -> dict:
    """Right-pad features: ``{"features": (b, n, f), "lengths": (b,)}`` (the encoder's inputs)."""
    n = max(int(it["features"].shape[0]) for it in items)
    f = items[0]["features"].shape[-1]
    feats = torch.zeros(len(items), n, f)
    for i, it in enumerate(items):
        feats[i, : it["features"].shape[0]] = it["features"]
    return {"features": feats, "lengths": torch.stack([torch.as_tensor(it["lengths"]) for it in items]).long()}


def empty(item: dict) -> dict:
    """An all-padding item (0 frames): encodes to nothing."""
    return {"features": item["features"].new_zeros(0, item["features"].shape[-1]),
            "lengths": torch.zeros((), dtype=torch.long)}


def num_tokens(item: dict, modality: Modality) -> int:
    """Adapter output frames (80 ms each) for one item: the placeholders it needs."""
    m = num_stacked_frames(torch.as_tensor(item["lengths"]).reshape(1), modality.encoder.stacker.stride)
    return int(modality.adapter.output_lengths(m)[0])


def record_prompt(rec: dict) -> str | None:
    """The task prompt of a manifest record: ``asr`` and ``translate`` get Llama 3's prompts,
    ``qa`` (spoken dialogue) none: the speech itself is the user's turn. Without a ``task``:
    None, i.e. the type's default prompt, which is also none (spoken dialogue); ASR
    manifests say ``"task": "asr"``."""
    task = rec.get("task")
    if task == "asr":
        return ASR_PROMPT.format(language=rec.get("language", "English"))
    if task == "translate":
        return TRANSLATE_PROMPT.format(language=rec.get("target_language", "English"))
    if task == "qa":
        return ""
    return None


def espeak_source(**options) -> list[dict]:
    """Built-in data source ``type: espeak`` (see :func:`mm.speech.espeak_records`)."""
    from mm.speech import espeak_records
    return espeak_records(**options)


SPEECH = ModalityType(
    name="speech", kind="tokens", build=build, read=read, preprocess=preprocess, collate=collate,
    empty=empty, num_tokens=num_tokens, suffixes=SUFFIXES, prompt="", sources={"espeak": espeak_source},
    record_prompt=record_prompt, init_options=("boundary_init", "encoder.branch_init"),
)


def speech_modality_name(types: dict) -> str:
    """The name under which a model holds its (first) speech modality."""
    for name, t in types.items():
        if t.kind == "tokens" and t.read is read:
            return name
    raise KeyError(f"the model has no speech modality (modalities: {', '.join(sorted(types)) or 'none'})")


# -- BEST-RQ pre-training ------------------------------------------------------------------
class BestRqObjective:
    """BEST-RQ self-supervised pre-training of the speech encoder (no text, no LLM).

    ``extra``: ``modality`` (default: the model's speech modality), ``preset`` (``tiny`` |
    ``llama3``) or explicit ``num_codebooks``, ``codebook_size``, ``code_dim``, ``mask_prob``,
    ``mask_span``, ``noise_std``; ``quantizer_seed``. Only the prediction heads live here
    (``modules``); the frozen quantiser is rebuilt from its seed.
    """

    SIZES = ("num_codebooks", "codebook_size", "code_dim", "mask_prob", "mask_span", "noise_std")
    PRESETS = {
        "tiny": dict(num_codebooks=4, codebook_size=256, code_dim=16, mask_prob=0.04, mask_span=10),
        "llama3": dict(num_codebooks=16, codebook_size=8192, code_dim=16, mask_prob=0.025, mask_span=32),
    }

    def __init__(self, cfg, model, types: dict, tokenizer=None):
        from mm.data import SampleStream
        from mm.objectives import check_extra

        check_extra(cfg, ("modality", "preset", "quantizer_seed") + self.SIZES, "best_rq")
        ex = dict(cfg.extra)
        self.cfg = cfg
        self.name = ex.pop("modality", None) or speech_modality_name(types)
        self.type, self.mod = types[self.name], model.modalities[self.name]
        sizes = dict(self.PRESETS[ex.pop("preset", "tiny")])
        sizes.update({k: ex[k] for k in self.SIZES if k in ex})
        self.best_rq = best_rq(encoder=self.mod.encoder, seed=int(ex.get("quantizer_seed", 0)), **sizes)
        self.modules = nn.ModuleDict({"heads": self.best_rq.heads})
        self.preprocess = cfg.data.preprocess.get(self.name, {})
        self.stream = SampleStream.from_config(cfg, types, self._make)

    def _make(self, rec: dict) -> dict:
        from mm.data import BadSample, _paths

        if "_error" in rec:
            raise BadSample(rec["_error"])
        paths = _paths(rec, self.name)
        if not paths:
            raise BadSample(f"{rec.get('_where', 'record')}: no {self.name!r} file")
        try:
            return self.type.preprocess(self.type.read(paths[0]), self.mod, **self.preprocess)
        except ValueError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BadSample(msg if str(paths[0]) in msg else f"{paths[0]}: {msg}") from None

    def batch(self, step: int):
        inputs = collate(self.stream.batch(step, self.cfg.optim.batch_size))
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)  # masks: a function of step
        return inputs["features"], inputs["lengths"], gen

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        features, lengths, gen = batch
        device = next(self.mod.parameters()).device
        self.best_rq.quantizer.to(device)
        out = self.best_rq(features.to(device), lengths.to(device), generator=gen)
        return out.loss, {"samples": int(features.shape[0]), "accuracy": round(float(out.accuracy), 4),
                          "masked_frames": out.num_masked}


# -- LM loss with an auxiliary CTC alignment loss ---------------------------------------------
class SpeechLMObjective:
    """The ``lm`` objective (next-token loss on the target text, LLM frozen) plus, on ASR
    samples (and spoken questions, ``ctc_questions``), an auxiliary CTC loss that aligns the
    adapter's output frames with the target text's tokens in the frozen LLM's own
    input-embedding space: a frame's logit for a token
    is minus its squared distance to the token's (frozen) embedding. "Blank" is the embedding
    of the one-token text ``ctc_blank`` (default ``" "``: frames between words then read like
    extra spaces, which the LLM and the WER normalisation ignore), or a learned vector when
    ``ctc_blank`` is null. Targets are the transcript's tokens with a leading space (each word
    as it appears inside a sentence); negatives are the tokens of the batch's targets.

    The first ``ctc_only_steps`` steps train encoder + adapter on the CTC loss alone, without
    running the LLM (no LLM forward or backward: about 10x cheaper per sample on 2 CPU cores,
    configs/demo/speech_adapter.yaml); then LM + ``ctc_weight`` x CTC. This only
    speeds up learning (a CPU demo has a few hundred steps); ``ctc_weight: 0`` and
    ``ctc_only_steps: 0`` make it exactly the ``lm`` objective.

    ``extra``: ``ctc_weight`` (default 0.5), ``align_weight`` (default 1.0, ramped up linearly
    over the CTC-only steps; see :meth:`_ctc`),
    ``ctc_only_steps`` (default 0), ``ctc_blank``,
    ``ctc_batch_size`` (samples drawn for a CTC-only step, of which those with a CTC target are used;
    default ``optim.batch_size``),
    ``ctc_questions`` (default false: CTC on ASR samples only; true: also on spoken-QA
    samples, whose CTC target is the spoken question, the record's ``spoken`` text),
    ``ctc_negatives`` (default 0: the classes are the batch's target tokens; N: also N random
    tokens of the LLM's vocabulary per step, so that frames move away from tokens no target
    uses: the vocabulary read-out of :func:`mm.modality.vocabulary_readout` picks the nearest
    of all of them),
    ``ctc_bucket`` (default 1: off): a CTC-only step's batch comes from a group of this many
    steps' draws sorted by length and cut into batches of similar length (in an order drawn
    from the seed), so that little of a batch is padding; the group sees exactly the samples
    its steps would draw unsorted, and a batch is still a function of (seed, step),
    ``spec_augment`` (default off): a mapping of
    :func:`encoders.speech_features.spec_augment`'s options (``freq_masks``, ``freq_width``,
    ``time_masks``, ``time_width``, ``warp``), applied to every training batch's features,
    CTC-only and LM steps alike, drawn from (seed, step),
    ``phone_ctc`` (default 0: off): the weight of a second CTC loss, on the encoder's own
    frames (40 ms, before the adapter), against the phonemes eSpeak NG says for the same text
    (:func:`mm.sources.espeak.phonemes`, in the record's ``voice``, or ``phone_voice``,
    default ``"en-us"``, for records without one) through a linear head that only training
    uses. A word's tokens are one class each, learnt from the few times the word is heard; its
    phonemes are shared with every other word, so the encoder is taught the sounds themselves.
    It applies wherever the token CTC loss does,
    ``modality`` (default: the speech modality).
    """

    def __init__(self, cfg, model, types: dict, tokenizer):
        from functools import partial

        from mm.data import SampleStream, make_sample
        from mm.objectives import check_extra

        check_extra(cfg, ("ctc_weight", "align_weight", "ctc_only_steps", "ctc_blank", "ctc_batch_size", "ctc_questions",
                          "ctc_negatives", "ctc_bucket", "spec_augment", "phone_ctc", "phone_voice", "modality"), "speech_lm")
        ex = cfg.extra
        self.cfg, self.model, self.types, self.tokenizer = cfg, model, types, tokenizer
        self.name = ex.get("modality") or speech_modality_name(types)
        self.ctc_weight = float(ex.get("ctc_weight", 0.5))
        self.ctc_only_steps = int(ex.get("ctc_only_steps", 0))
        self.ctc_batch_size = int(ex.get("ctc_batch_size", cfg.optim.batch_size))
        self.align_weight = float(ex.get("align_weight", 1.0))
        self.ctc_questions = bool(ex.get("ctc_questions", False))
        self.ctc_negatives = int(ex.get("ctc_negatives", 0))
        self.spec_augment = dict(ex.get("spec_augment") or {})
        self.ctc_bucket = max(1, int(ex.get("ctc_bucket", 1)))
        self.phone_weight = float(ex.get("phone_ctc", 0) or 0)
        self.phone_voice = str(ex.get("phone_voice", "en-us"))
        self._group: tuple[int, list] | None = None  # (group, its batches of (sample, ctc) pairs)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        weight = model.llm.get_input_embeddings().weight
        # the alignment loss's scale: the typical squared embedding norm (the table is frozen)
        self.scale = float(weight.detach().float().pow(2).sum(-1).mean())
        dim = weight.shape[1]
        blank = ex.get("ctc_blank", " ")
        self.blank_id = None
        if blank is None:
            self.modules = nn.ModuleDict({"ctc_blank": _Vector(dim)})
        else:
            self.blank_id = _one_token(tokenizer(blank, add_special_tokens=False)["input_ids"],
                                       f"extra.ctc_blank {blank!r}")
            self.modules = nn.ModuleDict()
        if self.phone_weight:
            from mm.sources.espeak import ENGLISH_PHONEMES, OTHER_PHONEME, phonemes

            self._phonemes = phonemes
            self.phone_ids = {p: i + 1 for i, p in enumerate(ENGLISH_PHONEMES + (OTHER_PHONEME,))}  # 0 = blank
            self.phone_other = self.phone_ids[OTHER_PHONEME]
            self.phone_counts: dict[str, list[int]] = {}  # language -> [phonemes, of them <other>]
            self.phone_warned: set[str] = set()  # languages warned about
            self.modules["phone_head"] = nn.Linear(model.modalities[self.name].encoder.dim, len(self.phone_ids) + 1)
        self._make_sample = partial(make_sample, model=model, types=types, tokenizer=tokenizer,
                                    preprocess=cfg.data.preprocess)
        self.stream = SampleStream.from_config(cfg, types, self._make)

    def _make(self, rec: dict):
        sample = self._make_sample(rec)
        ctc = None
        said = rec.get("text") if rec.get("task") == "asr" else rec.get("spoken") if self.ctc_questions else None
        if said and sample.media.get(self.name):
            tokens = [t for t in self.tokenizer(" " + said.strip(), add_special_tokens=False)["input_ids"]
                      if t != self.blank_id]
            phones = None
            if self.phone_weight:
                voice = rec.get("voice") or self.phone_voice
                phones = [self.phone_ids.get(p, self.phone_other) for p in self._phonemes(said.strip(), voice)]
                self._count_phones(voice, phones)
            ctc = _Said(tokens, phones) if tokens else None
        return sample, ctc

    def _count_phones(self, voice: str, phones: list[int]) -> None:
        """Warn once per language with over 10% of its phonemes outside the English inventory
        (after 500 of them): the loss sees those as one `<other>` class (English text has none)."""
        lang = voice.split("+")[0]
        if lang in self.phone_warned:
            return
        n = self.phone_counts.setdefault(lang, [0, 0])
        n[0] += len(phones)
        n[1] += sum(p == self.phone_other for p in phones)
        if n[0] >= 500 and n[1] > 0.1 * n[0]:
            log.warning("extra.phone_ctc: %.0f%% of the phonemes of voice language %r are not in the English "
                        "inventory (mm.sources.espeak.ENGLISH_PHONEMES); the phoneme loss sees them as one "
                        "class", 100 * n[1] / n[0], lang)
            self.phone_warned.add(lang)

    def batch(self, step: int):
        from mm.data import collate

        # the alignment loss ramps up over the CTC-only steps (early CTC paths are noise)
        ramp = min(1.0, (step + 1) / self.ctc_only_steps) if self.ctc_only_steps else 1.0
        negatives = []
        if self.ctc_negatives:  # random vocabulary rows, a function of (seed, step)
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
            vocab_size = self.model.llm.get_input_embeddings().weight.shape[0]
            negatives = torch.randint(vocab_size, (self.ctc_negatives,), generator=gen).tolist()
        if step < self.ctc_only_steps:  # the samples with a CTC target of a draw of ctc_batch_size
            pairs = self._ctc_pairs(step)
            if pairs:
                items = [s.media[self.name][0][0] for s, _ in pairs]
                return ("ctc", self._augment(self.types[self.name].collate(items), step), [c for _, c in pairs], ramp,
                        negatives)
        pairs = self.stream.batch(step, self.cfg.optim.batch_size)
        b = collate([s for s, _ in pairs], types=self.types, pad_id=self.pad_id)
        if self.name in b.media:
            b.media[self.name].inputs = self._augment(b.media[self.name].inputs, step)
        return "lm", b, [c for _, c in pairs], ramp, negatives

    def _ctc_pairs(self, step: int) -> list:
        """(sample, CTC target) pairs of a CTC-only step, bucketed by length (``ctc_bucket``)."""
        if self.ctc_bucket == 1:
            return [(s, c) for s, c in self.stream.batch(step, self.ctc_batch_size) if c]
        g = step // self.ctc_bucket
        if self._group is None or self._group[0] != g:
            steps = range(g * self.ctc_bucket, min((g + 1) * self.ctc_bucket, self.ctc_only_steps))
            draws = [[(s, c) for s, c in self.stream.batch(k, self.ctc_batch_size) if c] for k in steps]
            sizes = [len(d) for d in draws]
            pool = sorted((p for d in draws for p in d),
                          key=lambda p: int(p[0].media[self.name][0][0]["lengths"]))  # stable: ties keep draw order
            chunks, at = [], 0
            for n in sizes:
                chunks.append(pool[at:at + n])
                at += n
            order = list(range(len(chunks)))
            random.Random(self.cfg.seed * 1_000_003 + g).shuffle(order)  # not short-to-long within a group
            self._group = (g, [chunks[i] for i in order])
        return self._group[1][step - g * self.ctc_bucket]

    def _augment(self, inputs: dict, step: int) -> dict:
        """``inputs`` with ``spec_augment`` applied to its features (new tensors; the cached
        samples stay as they are)."""
        if not self.spec_augment:
            return inputs
        from encoders.speech_features import spec_augment

        # 2**40 apart from the negatives' seeds (seed * 1_000_003 + step), which an offset of a
        # few steps made the same stream as a later step's negatives
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step + 2**40)
        return dict(inputs, features=spec_augment(inputs["features"], inputs["lengths"], gen, **self.spec_augment))

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        import torch.nn.functional as F

        kind, b, ctc_targets, ramp, negatives = batch
        align_weight = self.align_weight * ramp
        model = self.model
        mod = model.modalities[self.name]
        if kind == "ctc":  # encoder + adapter only
            device = next(mod.parameters()).device
            feats, fmask = mod.encode({k: v.to(device) for k, v in b.items()})
            frames, fmask2 = mod.adapter(feats, fmask)  # (b, m2, d), (b, m2)
            ctc, align = self._ctc(frames, fmask2.sum(-1), [c.tokens for c in ctc_targets], negatives)
            info = {"samples": len(ctc_targets), "ctc_loss": round(ctc.item(), 4), "align_loss": round(align.item(), 4)}
            return ctc + align_weight * align + self._phone_loss(feats, fmask, ctc_targets, info), info
        h, _, p, (_, tokens) = model.run(b.input_ids, b.attention_mask, media=b.media)
        target = b.labels[:, p + 1:]
        sel = target != -100
        hs, ts = h[:, :target.shape[1]][sel], target[sel]  # (s, d), (s,)
        lm = F.cross_entropy(model.logits(hs).float(), ts) if ts.numel() else h.sum() * 0.0
        info = {"tokens": int(b.attention_mask.sum()), "samples": b.input_ids.shape[0], "lm_loss": round(lm.item(), 4)}
        rows = [i for i, c in enumerate(ctc_targets) if c]
        if not self.ctc_weight or not rows or self.name not in tokens:
            return lm, info
        emb, emask, mi, _ = tokens[self.name]  # (b, n, m2 + 2, d): [begin, frames..., end]
        said = [ctc_targets[i] for i in rows]
        first = [r * mi.valid.shape[1] for r in rows]  # each row's first item (one item per sample here)
        feats = fmask = None
        # the encoder's frames: for the phoneme loss, and for the token CTC loss when the LLM saw
        # the frames read out as tokens (the CTC loss needs them as they were)
        if mod.readout_blank is not None or self.phone_weight:
            feats, fmask = mod.encode(mi.inputs)  # (b*n, m, e)
            feats, fmask = feats[first], fmask[first]
        if mod.readout_blank is None:
            frames, lengths = emb[rows, 0, 1:-1], emask[rows, 0].sum(-1) - 2
        else:
            frames, fmask2 = mod.adapter(feats, fmask)
            lengths = fmask2.sum(-1)
        ctc, align = self._ctc(frames, lengths, [c.tokens for c in said], negatives)
        info.update(ctc_loss=round(ctc.item(), 4), align_loss=round(align.item(), 4))
        return lm + self.ctc_weight * (ctc + align_weight * align + self._phone_loss(feats, fmask, said, info)), info

    def _phone_loss(self, feats: torch.Tensor, fmask: torch.Tensor, said: list, info: dict) -> torch.Tensor | float:
        """``phone_ctc`` x the phoneme CTC loss of the encoder's frames (r, m, e) with valid
        ``fmask`` (r, m) against each row's phonemes (0.0 when off); logged as ``phone_loss``."""
        import torch.nn.functional as F

        if not self.phone_weight:
            return 0.0
        logp = self.modules["phone_head"](feats.float()).log_softmax(-1)  # (r, m, P + 1)
        tgt = [torch.tensor(s.phones, dtype=torch.long) for s in said]
        loss = F.ctc_loss(logp.transpose(0, 1), torch.cat(tgt), fmask.sum(-1).cpu(),
                          torch.tensor([len(t) for t in tgt]), blank=0, zero_infinity=True)
        info["phone_loss"] = round(loss.item(), 4)
        return self.phone_weight * loss

    def _ctc(self, frames: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]],
             negatives: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC + alignment loss of frames (r, m2, d) with valid ``lengths`` (r,) against token
        id lists. The alignment loss pulls each frame onto the embedding the best CTC path
        gives it: the token's embedding on the first frame of its run, blank elsewhere. So the
        frames become the text's embeddings spaced out by blanks, which the LLM reads as text."""
        import torch.nn.functional as F
        from torchaudio.functional import forced_align

        used = sorted({t for ts in targets for t in ts})  # the targets' tokens
        vocab = sorted(set(used) | (set(negatives) - {self.blank_id}))
        weight = self.model.llm.get_input_embeddings().weight
        table = weight[vocab].detach()  # (k, d), frozen
        blank = self.modules["ctc_blank"].value if self.blank_id is None else weight[self.blank_id].detach()
        classes = torch.cat([blank[None].to(table), table]).float()  # (k + 1, d)
        frames = frames.float()
        r, m2, d = frames.shape
        # logit = -|f - c|^2 = 2 f.c - |c|^2 - |f|^2, and a log-softmax over the classes ignores
        # the frame's own |f|^2: one addmm, no elementwise pass over the (r * m2, k + 1)
        # logits (cdist's backward is a slow elementwise kernel, several times the whole step
        # with thousands of classes)
        logits = torch.addmm(classes.pow(2).sum(-1).neg(), frames.reshape(r * m2, d), classes.T, alpha=2)
        logp = logits.log_softmax(-1).view(r, m2, -1)  # (r, m2, k + 1)
        # CTC reads only blank's and the targets' u columns: it runs on those plus one column
        # holding the rest of each frame's probability (log(1 - their sum)), so its input is
        # still a distribution per frame (any CTC gradient convention stays right) and its
        # backward writes (m2, r, u + 2) instead of (m2, r, k + 1): ~25 ms less a demo step
        column = {t: j + 1 for j, t in enumerate(used)}  # 0 = blank
        at = torch.searchsorted(torch.tensor(vocab), torch.tensor(used)) + 1  # their columns among the k + 1
        cols = torch.cat([torch.zeros(1, dtype=torch.long), at]).to(logp.device)
        kept = logp.index_select(-1, cols)  # (r, m2, u + 1)
        rest = (1 - kept.exp().sum(-1, keepdim=True)).clamp_min(1e-30).log()  # (r, m2, 1)
        logp = torch.cat([kept, rest], -1)  # (r, m2, u + 2): blank, the targets' tokens, the rest
        tgt = [torch.tensor([column[t] for t in ts], dtype=torch.long) for ts in targets]
        lengths = lengths.cpu()
        ctc = F.ctc_loss(logp.transpose(0, 1), torch.cat(tgt), lengths, torch.tensor([len(t) for t in tgt]),
                         blank=0, zero_infinity=True)
        zero = frames.sum() * 0.0
        if not self.align_weight:
            return ctc, zero
        align = []
        with torch.no_grad():
            for i, t in enumerate(tgt):
                n = int(lengths[i])
                repeats = int((t[1:] == t[:-1]).sum())
                if n < len(t) + repeats:
                    continue  # no CTC path: too many tokens for the frames
                path = forced_align(logp[i:i + 1, :n].detach().cpu(), t[None], blank=0)[0][0]  # (n,)
                first = torch.ones_like(path, dtype=torch.bool)
                first[1:] = path[1:] != path[:-1]
                align.append((i, n, torch.where(first, path, torch.zeros_like(path))))
        if not align:
            return ctc, zero
        kept_classes = classes.index_select(0, cols)  # (u + 1, d): a path never visits the rest column
        dist = torch.cat([(frames[i, :n] - kept_classes[lab.to(frames.device)]).pow(2).sum(-1)
                          for i, n, lab in align])
        return ctc, dist.mean() / self.scale


class _Said(NamedTuple):
    """What a training utterance says, as CTC targets."""
    tokens: list[int]  # the LLM's tokens of the transcript (the blank's token left out)
    phones: list[int] | None  # its phonemes' classes (``phone_ctc``), else None


class _Vector(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.value = nn.Parameter(torch.randn(dim) * 0.02)


def _register() -> None:
    from mm.objectives import register_objective
    register_objective("best_rq", BestRqObjective)
    register_objective("speech_lm", SpeechLMObjective)


_register()
