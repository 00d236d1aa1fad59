"""Speech: synthetic data, transcription of files of any length, metrics, and the CPU demo.

- :func:`espeak_records`: the ``type: espeak`` data source. Speaks built-in sentences, the
  built-in spoken questions (answered by the frozen LLM itself) or a JSONL of texts with
  eSpeak NG voices, varying voice, speed and pitch; ``voices: eval`` holds voices out.
- :func:`transcribe_files` / :func:`transcribe_waves`: ASR with the model. Audio longer than
  the window (60 s) is cut into chunks, each at the quietest 50 ms near the window's end, read
  block by block (memory bounded by the chunk) and the transcripts joined with a space.
  Batched and one-by-one transcription give the same text (padding never leaks, and each
  row's output is cut to its own length budget).
- :func:`word_error_rate`: jiwer WER after :func:`normalize_transcript` (lower case,
  punctuation removed, whitespace collapsed; no number or spelling normalisation).
- :func:`qa_agreement`: fraction of spoken questions answered exactly like the same question
  in text (after :func:`mm.infer.normalize`).
- :func:`run_speech_demo`: both speech stages from ``configs/demo`` plus evaluation.

Notation: s=samples (16 kHz), b=batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from mm.modalities.speech import (ASR_PROMPT, WINDOW_SECONDS, SpeechInputError, num_tokens, preprocess,
                                  single_thread, speech_modality_name)

log = logging.getLogger("mm")

# -- text: sentences and questions -------------------------------------------------------
ADJECTIVES = ("red", "blue", "green", "yellow", "black", "white", "brown", "big", "small", "old", "new",
              "young", "happy", "sad", "fast", "slow", "hot", "cold", "warm", "long", "short", "tall",
              "little", "good", "bad", "quiet", "loud", "soft", "hard", "dark", "bright", "clean",
              "dirty", "funny", "kind", "heavy", "empty", "full", "rich", "poor")
ANIMALS = ("cat", "dog", "bird", "horse", "cow", "fish", "duck", "sheep", "goat", "pig", "lion",
           "tiger", "bear", "mouse", "rabbit", "frog", "spider", "snake", "monkey", "chicken")
THINGS = ("house", "car", "book", "table", "chair", "door", "tree", "flower", "apple", "banana",
          "cake", "cup", "box", "ball", "hat", "shoe", "phone", "boat", "train", "river")
PEOPLE = ("man", "woman", "boy", "girl", "teacher", "doctor", "farmer", "friend")
NAMES = ("anna", "tom", "maria", "john", "lucy", "peter", "sara", "david")
PLACES = ("school", "market", "park", "city", "village", "beach", "forest", "station")
VERBS = ("sees", "likes", "wants", "finds", "takes", "has", "needs", "loves", "buys", "opens")
PAST = ("saw", "liked", "found", "took", "had", "bought", "opened", "held", "made", "lost")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "twenty")
COUNTRIES = ("france", "germany", "italy", "spain", "japan", "china", "india", "russia", "egypt",
             "kenya", "canada", "mexico", "brazil", "peru", "chile", "norway", "sweden", "poland",
             "greece", "turkey", "iran", "iraq", "cuba", "ireland", "austria", "portugal",
             "australia", "argentina", "nigeria", "ghana", "vietnam", "thailand", "belgium",
             "hungary", "finland", "denmark", "morocco", "ukraine", "indonesia", "pakistan")
NOUNS = ANIMALS + THINGS + PEOPLE


def _plural(noun: str) -> str:
    irregular = {"man": "men", "woman": "women", "child": "children", "mouse": "mice", "sheep": "sheep",
                 "fish": "fish", "baby": "babies", "box": "boxes", "bus": "buses", "party": "parties"}
    return irregular.get(noun, noun + "s")


_PATTERNS = (  # statements: the frozen LLM repeats them as they are (it would answer questions)
    lambda r: f"the {r.choice(ADJECTIVES)} {r.choice(NOUNS)} {r.choice(VERBS)} the {r.choice(NOUNS)}",
    lambda r: f"{r.choice(NAMES).title()} {r.choice(PAST)} a {r.choice(ADJECTIVES)} {r.choice(THINGS)}",
    lambda r: f"{r.choice(('we', 'they', 'i', 'you'))} have {r.choice(NUMBERS[1:])} {_plural(r.choice(NOUNS))}",
    lambda r: f"the {r.choice(NOUNS)} is {r.choice(ADJECTIVES)}",
    lambda r: f"{r.choice(NAMES).title()} went to the {r.choice(PLACES)}",
    lambda r: f"my {r.choice(PEOPLE)} lives in {r.choice(COUNTRIES).title()}",
    lambda r: f"the capital of {r.choice(COUNTRIES).title()} is {r.choice(ADJECTIVES)}",
    lambda r: f"{r.choice(NUMBERS[:9])} plus {r.choice(NUMBERS[:9])} is {r.choice(NUMBERS)}",
    lambda r: f"the {r.choice(ANIMALS)} has {r.choice(NUMBERS[:9])} legs",
    lambda r: f"{r.choice(ADJECTIVES)} is the opposite of {r.choice(ADJECTIVES)}",
    lambda r: f"the {r.choice(ANIMALS)} is in the {r.choice(PLACES)}",
    lambda r: f"a {r.choice(ADJECTIVES)} {r.choice(PEOPLE)} {r.choice(PAST)} the {r.choice(THINGS)}",
    # two more with a country: 40 countries in 2 of 12 frames were heard ~9 times each in 3,000
    # sentences (a noun ~30), and countries were the words the spoken questions lost most
    lambda r: f"{r.choice(NAMES).title()} flew to {r.choice(COUNTRIES).title()}",
    lambda r: f"the {r.choice(NOUNS)} is from {r.choice(COUNTRIES).title()}",
)


def sentences(n: int, *, seed: int = 0) -> list[str]:
    """``n`` short statements (3-7 words) from a vocabulary of about 200 words (those of the
    built-in spoken questions among them), a function of ``seed``. Names and countries are
    written as the questions write them (capitalised): a word's tokens differ with its case,
    and a spoken question's words are learnt from these sentences too."""
    r = random.Random(seed)
    return [r.choice(_PATTERNS)(r) for _ in range(n)]


CAPITALS = {"france": "paris", "germany": "berlin", "italy": "rome", "spain": "madrid", "japan": "tokyo",
            "china": "beijing", "india": "new delhi", "russia": "moscow", "egypt": "cairo", "kenya": "nairobi",
            "canada": "ottawa", "mexico": "mexico city", "brazil": "brasilia", "peru": "lima",
            "chile": "santiago", "norway": "oslo", "sweden": "stockholm", "poland": "warsaw",
            "greece": "athens", "turkey": "ankara", "iran": "tehran", "iraq": "baghdad", "cuba": "havana",
            "ireland": "dublin", "austria": "vienna", "portugal": "lisbon", "australia": "canberra",
            "argentina": "buenos aires", "nigeria": "abuja", "ghana": "accra", "vietnam": "hanoi",
            "thailand": "bangkok", "belgium": "brussels", "hungary": "budapest", "finland": "helsinki",
            "denmark": "copenhagen", "morocco": "rabat", "ukraine": "kyiv|kiev", "indonesia": "jakarta",
            "pakistan": "islamabad"}
# the adjectives with a clear opposite (colours have none): the words accepted as one
OPPOSITES = {"big": "small|little", "small": "big|large", "old": "new|young", "new": "old", "young": "old",
             "happy": "sad|unhappy", "sad": "happy", "fast": "slow", "slow": "fast|quick", "hot": "cold",
             "cold": "hot|warm", "warm": "cold|cool", "long": "short", "short": "long|tall", "tall": "short",
             "little": "big|large", "good": "bad|evil", "bad": "good", "quiet": "loud|noisy",
             "loud": "quiet|soft", "soft": "hard|loud", "hard": "soft|easy", "dark": "light|bright",
             "bright": "dark|dim", "clean": "dirty|unclean", "dirty": "clean", "funny": "serious|boring",
             "kind": "unkind|cruel|mean", "heavy": "light", "empty": "full", "full": "empty", "rich": "poor",
             "poor": "rich", "black": "white", "white": "black"}
LEGS = {"cat": 4, "dog": 4, "bird": 2, "horse": 4, "cow": 4, "duck": 2, "sheep": 4, "goat": 4, "pig": 4,
        "lion": 4, "tiger": 4, "bear": 4, "mouse": 4, "rabbit": 4, "frog": 4, "spider": 8, "monkey": 2,
        "chicken": 2}  # fish and snake left out: no legs is a trick question for a small LLM
_NUMBER_WORDS = {w: i for i, w in enumerate(("zero",) + NUMBERS[:12] + (
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"))}  # word -> value


CAPITAL_Q, OPPOSITE_Q, LEGS_Q, PLURAL_Q = QUESTION_FRAMES = (
    "What is the capital of {}?", "What is the opposite of {}?", "How many legs does a {} have?",
    "What is the plural of {}?")
SUM_Q = "What is {} plus {}?"


@functools.lru_cache(maxsize=1)
def _question_keys() -> dict[str, tuple[str, object]]:
    """Each built-in spoken question -> (kind, what a correct answer says); not to be changed."""
    keys: dict[str, tuple[str, object]] = {}
    for c, capital in CAPITALS.items():
        keys[CAPITAL_Q.format(c.title())] = ("words", capital.split("|"))
    for a, opposite in OPPOSITES.items():
        keys[OPPOSITE_Q.format(a)] = ("words", opposite.split("|"))
    for a, n in LEGS.items():
        keys[LEGS_Q.format(a)] = ("numbers", n)
    for noun in NOUNS:  # fish and sheep left out: a plural equal to the noun cannot be told from an echo
        if (plural := _plural(noun)) != noun:
            keys[PLURAL_Q.format(noun)] = ("words", [plural])
    # numbers as words: spoken digits would need a space token before each, and " " is the
    # CTC blank of the demo's read-out (a digit's space could never be written)
    for i, a in enumerate(NUMBERS[:9]):
        for j, b in enumerate(NUMBERS[:9]):
            keys[SUM_Q.format(a, b)] = ("sum", i + j + 2)
    return keys


def questions() -> list[str]:
    """Candidate spoken questions (text form), each with a known correct answer; the frozen
    LLM's answers become the targets where they are right (:func:`answer_is_correct`)."""
    return list(_question_keys())


def _numbers(text: str) -> list[int]:
    """The numbers a text states, as digits or words (zero-twenty), in order."""
    import re
    return [int(t) if t.isdigit() else _NUMBER_WORDS[t] for t in re.findall(r"\d+|[a-z]+", text.lower())
            if t.isdigit() or t in _NUMBER_WORDS]


def answer_is_correct(question: str, answer: str) -> bool | None:
    """Whether ``answer`` answers a built-in ``question`` correctly (None: not a built-in one).
    Capitals, opposites and plurals: an accepted word or name appears in it (whole words). Legs: every
    number it states is the right one. Sums: the last number it states is the sum."""
    from mm.infer import normalize
    key = _question_keys().get(question)
    if key is None:
        return None
    kind, expected = key
    if kind == "words":
        said = f" {normalize(answer)} "
        return any(f" {w} " in said for w in expected)
    found = _numbers(answer)
    if kind == "numbers":
        return bool(found) and set(found) == {expected}
    return bool(found) and found[-1] == expected


def question_forms(n: int, *, seed: int = 0, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` questions in the built-in questions' frames, each frame with any word of the
    sentences' vocabulary (and sums of any two numbers), none of them in ``exclude``: spoken
    for transcription, they make the last word of a question something to listen to. With
    only the built-in questions to hear, a question's frame predicts its ending, and the
    encoder learns the training questions' endings instead (a held-out "What is the capital
    of Germany?" was read as "... of Iran?"). Drawn without repeats while the ~620 forms last."""
    words = [w.title() if w in COUNTRIES or w in NAMES else w
             for w in dict.fromkeys(ADJECTIVES + NOUNS + NAMES + COUNTRIES + PLACES)]
    forms = [f.format(w) for f in QUESTION_FRAMES for w in words]
    forms += [SUM_Q.format(a, b) for a in NUMBERS[:9] for b in NUMBERS[:9]]
    forms = [q for q in forms if q not in exclude]
    r = random.Random(seed)
    out: list[str] = []
    while len(out) < n and forms:
        out += r.sample(forms, min(n - len(out), len(forms)))
    return out


def _split_of(text: str, eval_fraction: float) -> str:
    h = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if h < eval_fraction else "train"


def answer_questions(qs: list[str], *, llm: str = "smollm2", max_new_tokens: int = 20,
                     batch_size: int = 64) -> list[dict]:
    """The frozen LLM's greedy text answers, kept only when they end within ``max_new_tokens``
    (short targets) and are right (:func:`answer_is_correct`; a question without a known answer
    is kept as it is). Every answer is cached per LLM fingerprint in ``$MM_CACHE/speech``."""
    from mm.config import ModelConfig
    from mm.infer import answer_records
    from mm.llm import cache_dir
    from mm.model import MultimodalLM
    from mm.runs import get_llm

    frozen = get_llm(ModelConfig(llm=llm))
    key = hashlib.sha1(json.dumps([frozen.fingerprint, qs, max_new_tokens, "all answers"]).encode()).hexdigest()[:16]
    path = cache_dir() / "speech" / f"qa-{key}.jsonl"
    if path.exists():
        every = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        model = MultimodalLM(frozen.model, {})
        answers = answer_records(model, {}, frozen.tokenizer, [{"question": q} for q in qs],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
        tok = frozen.tokenizer
        every = [{"question": q, "answer": a,
                  "short": bool(a) and len(tok(a, add_special_tokens=False)["input_ids"]) <= max_new_tokens - 3}
                 for q, a in zip(qs, answers)]
        from mm.checkpoint import atomic_write_text
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in every))
    right = [answer_is_correct(r["question"], r["answer"]) is not False for r in every]
    wrong = right.count(False)
    kept = [{"question": r["question"], "answer": r["answer"]} for r, ok in zip(every, right) if r["short"] and ok]
    log.info("spoken QA: %d of %d questions kept (%d answered wrongly, %d right but long)", len(kept), len(every),
             wrong, len(every) - len(kept) - wrong)
    return kept


# -- synthetic speech data -------------------------------------------------------------
def _voices(voices) -> tuple[str, ...]:
    from mm.sources.espeak import EVAL_VOICES, TRAIN_VOICES
    if voices == "train":
        return TRAIN_VOICES
    if voices == "eval":
        return EVAL_VOICES
    if isinstance(voices, (list, tuple)) and voices:
        return tuple(voices)
    raise ValueError(f"voices must be 'train', 'eval' or a list of eSpeak voices, got {voices!r}")


def _texts(texts: str, *, n: int, seed: int, split: str | None, eval_fraction: float, llm: str,
           max_answer_tokens: int) -> list[tuple[str, str]]:
    """(spoken text, target text) pairs."""
    if texts == "sentences":
        return [(s, s) for s in sentences(n, seed=seed)]
    if texts == "question_forms":  # never a held-out (eval split) question
        held_out = {q for q in questions() if _split_of(q, eval_fraction) == "eval"}
        return [(q, q) for q in question_forms(n, seed=seed, exclude=held_out)]
    if texts == "qa":
        qs = questions()
        if split:
            qs = [q for q in qs if _split_of(q, eval_fraction) == split]
        return [(r["question"], r["answer"]) for r in answer_questions(qs, llm=llm, max_new_tokens=max_answer_tokens)]
    path = Path(texts)
    if not path.exists():
        from mm.data import DataError
        raise DataError(f"{path}: no such texts file (JSONL lines with 'say' and optional 'text')")
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            pairs.append((rec["say"], rec.get("text", rec["say"])))
    return pairs


def espeak_records(*, n: int = 1000, task: str = "asr", texts: str = "sentences", voices="train",
                   seed: int = 0, rate: tuple[int, int] = (150, 230), pitch: tuple[int, int] = (30, 70),
                   split: str | None = None, eval_fraction: float = 0.2, llm: str = "smollm2",
                   max_answer_tokens: int = 20, key: str = "audio", dir: str | None = None,
                   language: str = "English", name: str | None = None) -> list[dict]:
    """Speak texts with eSpeak NG into 16 kHz WAV files; return manifest records.

    Args:
        n: number of utterances. For ``texts`` other than ``sentences`` the texts are cycled.
        task: ``asr`` (target = the spoken text) or ``qa`` (target = the text's answer).
        texts: ``sentences`` (built-in, ``seed``-dependent), ``qa`` (built-in questions and the
            frozen LLM ``llm``'s own answers, ``split`` train/eval by question),
            ``question_forms`` (:func:`question_forms`, for ``asr``; never an eval-split
            question), or a JSONL file of ``{"say": ..., "text": ...}`` lines.
        voices: ``train``, ``eval`` (disjoint speakers) or a list of voice names.
        rate, pitch: ranges (inclusive) drawn uniformly per utterance.
        key: the record key holding the path (the model's speech modality name).
        dir: output folder (default: ``$MM_CACHE/speech/<hash of the options>``); an existing
            complete folder is reused, so the records are the same on every call.
        name: a label for evaluation reports (no effect on the data).
    """
    from mm.checkpoint import atomic_write_text
    from mm.data import read_manifest
    from mm.llm import cache_dir

    pool = _voices(voices)
    opts = dict(n=n, task=task, texts=texts, voices=list(pool), seed=seed, rate=list(rate), pitch=list(pitch),
                split=split, eval_fraction=eval_fraction, llm=llm, max_answer_tokens=max_answer_tokens,
                key=key, language=language, version=2)  # 2: seeded noise (mm.sources.espeak)
    pairs = _texts(texts, n=n, seed=seed, split=split, eval_fraction=eval_fraction, llm=llm,
                   max_answer_tokens=max_answer_tokens)
    if not pairs:
        return []
    opts["content"] = hashlib.sha1(json.dumps(pairs).encode()).hexdigest()
    folder = Path(dir) if dir else cache_dir() / "speech" / hashlib.sha1(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:16]
    manifest = folder / "records.jsonl"
    if manifest.exists():
        return read_manifest(manifest)
    import soundfile as sf
    import torchaudio

    from mm.sources.espeak import sample_rate, synthesize

    resample = torchaudio.transforms.Resample(sample_rate(), 16_000)  # the sinc kernel, made once

    folder.mkdir(parents=True, exist_ok=True)
    r = random.Random(seed * 7919 + 17)
    lines = []
    for i in range(n):
        say, target = pairs[i % len(pairs)]
        voice, wpm, pit = r.choice(pool), r.randint(*rate), r.randint(*pitch)
        wave, _ = synthesize(say, voice=voice, rate=wpm, pitch=pit)
        with torch.no_grad(), single_thread():
            wave = resample(torch.from_numpy(wave)).clamp(-1, 1).numpy()
        name = f"{i:06d}.wav"
        sf.write(folder / name, wave, 16_000, subtype="PCM_16")
        rec = {key: name, "text": target, "task": task, "voice": voice, "rate": wpm, "pitch": pit}
        if task == "asr":
            rec["language"] = language
        if say != target:
            rec["spoken"] = say
        lines.append(json.dumps(rec))
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    (folder / "options.json").write_text(json.dumps(opts, indent=1))
    return read_manifest(manifest)


# -- chunking ----------------------------------------------------------------------------
def quiet_cut(wave: torch.Tensor, *, search: int, frame: int = 800, hop: int = 160) -> int:
    """Cut position in ``wave`` (s,): centre of the quietest ``frame`` in its last ``search``
    samples (a pause between words, when there is one)."""
    s = wave.shape[0]
    lo = max(0, s - search)
    tail = wave[lo:]
    if tail.shape[0] < frame:
        return s
    energy = tail.unfold(0, frame, hop).pow(2).mean(-1)  # (frames,)
    # Latest among the quietest (ties: keep the chunk long).
    best = int((energy <= energy.min() * 1.0001 + 1e-12).nonzero().max())
    return lo + best * hop + frame // 2


def speech_chunks(path, *, window: float = WINDOW_SECONDS, search_fraction: float = 0.2,
                  sample_rate: int = 16_000) -> Iterator[torch.Tensor]:
    """Consecutive 16 kHz pieces of a file, each at most ``window`` seconds, cut at a quiet
    point within the last ``search_fraction`` of the window. Read block by block: memory
    stays within two windows whatever the file's length. Concatenated, they are the file."""
    from encoders.audio import iter_audio_chunks

    size = int(window * sample_rate)
    search = max(1, int(size * search_fraction))
    buf = torch.zeros(0)
    for block in iter_audio_chunks(path, chunk_seconds=window, sample_rate=sample_rate):
        buf = torch.cat([buf, block])
        while buf.shape[0] > size:
            cut = quiet_cut(buf[:size], search=search)
            yield buf[:cut]
            buf = buf[cut:]
    if buf.shape[0]:
        yield buf


# -- transcription -----------------------------------------------------------------------
SILENCE_RMS = 1e-4  # a chunk quieter than this is transcribed as "" without running the model


def _token_budget(seconds: float, tokens_per_second: float, extra: int) -> int:
    return int(math.ceil(seconds * tokens_per_second)) + extra


@torch.no_grad()
def transcribe_waves(model, types: dict, tokenizer, waves: list[torch.Tensor], *, batch_size: int = 16,
                     prompt: str | None = None, language: str = "English", tokens_per_second: float = 8.0,
                     extra_tokens: int = 8, max_seconds: float = WINDOW_SECONDS) -> list[str]:
    """Generate for each 16 kHz waveform (each within the window) with the ASR prompt (or
    ``prompt``; ``""`` for spoken dialogue). Each row decodes at most its own budget of
    ``ceil(seconds * tokens_per_second) + extra_tokens`` tokens, so the text does not depend on
    the batch, and keeps the reply's first line (:func:`first_line`) without the quotes the
    boundaries may add (:func:`unquote`). Silent or sub-25 ms
    waveforms give ``""``."""
    from mm.data import Sample, collate
    from mm.prompts import encode, end_of_turn_id, mark

    name = speech_modality_name(types)
    mod = model.modalities[name]
    text = ASR_PROMPT.format(language=language) if prompt is None else prompt
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = end_of_turn_id(tokenizer)
    out = [""] * len(waves)
    todo = []
    for i, w in enumerate(waves):
        if w.numel() < 400 or float(w.float().pow(2).mean().sqrt()) < SILENCE_RMS:
            continue
        item = preprocess(w, mod, max_seconds=max_seconds)
        enc = encode(tokenizer, text + mark(name), None, media_tokens={name: [num_tokens(item, mod) + 2]})
        budget = _token_budget(w.numel() / 16_000, tokens_per_second, extra_tokens)
        todo.append((i, Sample(ids=enc.ids, labels=enc.labels, media={name: [(item, enc.media[0][1])]},
                               prompted=bool(text.strip())), budget))
    for k in range(0, len(todo), batch_size):
        part = todo[k:k + batch_size]
        batch = collate([s for _, s, _ in part], types=types, pad_id=pad)
        ids = model.generate(batch.input_ids, batch.attention_mask, media=batch.media,
                             max_new_tokens=max(b for _, _, b in part), eos_token_id=eos)
        for row, (i, _, budget) in zip(ids, part):
            out[i] = unquote(first_line(tokenizer.decode(row[:budget], skip_special_tokens=True)))
    return out


def first_line(reply: str) -> str:
    """A transcript is the reply's first line: ASR targets are one line each, ended by the end
    of turn, but a frozen LLM that was never trained to stop after one (the demo trains the
    adapter with CTC only) may write on after a line break ("My woman lives in China.\n\nIn this
    context, ..."). A chunk of long audio is one line as well; the chunks are joined with spaces."""
    return reply.strip().split("\n", 1)[0].strip()


_QUOTES = '“”"'


def unquote(line: str) -> str:
    """A transcript line without the quotation marks that the frozen LLM may copy from the
    speech's boundary embeddings (the demo's start as an opening and a closing quote, so the
    LLM sometimes writes '“We have ten hats  "'): spaces collapse, a pair of quotes enclosing
    the whole line goes, and so does a lone quote at either end. Quotes that pair up inside the
    text stay ('He said "yes"'). WER is the same either way (its normalisation drops
    punctuation)."""
    s = " ".join(line.split())
    n = sum(c in _QUOTES for c in s)
    if n == 2 and s[0] in _QUOTES and s[-1] in _QUOTES:
        return s[1:-1].strip()
    if n % 2 == 1:
        if s[0] in _QUOTES:
            return s[1:].strip()
        if s[-1] in _QUOTES:
            return s[:-1].strip()
    return s


def transcribe_files(model, types: dict, tokenizer, paths, *, batch_size: int = 8,
                     window: float = WINDOW_SECONDS, language: str = "English") -> list[dict]:
    """Transcribe audio files of any length: ``[{"file", "duration", "text"}]`` in order.

    Every file's header is checked first; a bad file raises :class:`SpeechInputError` (a
    ValueError) whose one-line message names it, before any work. Long files are chunked
    (:func:`speech_chunks`) and the chunk transcripts joined; at most ``batch_size`` chunks
    are in memory at once, so an hour-long file needs no more memory than ``batch_size``
    windows.
    """
    from encoders.audio import audio_info

    paths = [str(p) for p in paths]
    infos = []
    for p in paths:
        try:
            infos.append(audio_info(p))
        except ValueError as e:
            raise SpeechInputError(str(e).splitlines()[0]) from None
    texts: list[list[str]] = [[] for _ in paths]

    def chunks():
        for fi, p in enumerate(paths):
            try:
                for ci, wave in enumerate(speech_chunks(p, window=window)):
                    yield fi, ci, wave
            except ValueError as e:
                raise SpeechInputError(str(e).splitlines()[0] if p in str(e) else f"{p}: {e}") from None

    pending: list[tuple[int, int, torch.Tensor]] = []

    def flush():
        outs = transcribe_waves(model, types, tokenizer, [w for _, _, w in pending], batch_size=batch_size,
                                language=language, max_seconds=window)
        for (fi, ci, _), t in zip(pending, outs):
            texts[fi].append(t)
        pending.clear()

    for fi, ci, wave in chunks():
        pending.append((fi, ci, wave))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return [{"file": p, "duration": round(info.duration, 3), "text": " ".join(t for t in ts if t)}
            for p, info, ts in zip(paths, infos, texts)]


# -- metrics -----------------------------------------------------------------------------
def normalize_transcript(text: str) -> str:
    """WER normalisation: lower case, punctuation removed (jiwer ``RemovePunctuation``),
    whitespace collapsed and stripped. Numbers and spellings are left as they are."""
    import jiwer
    t = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip()])
    return t(text or "")


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER (jiwer): total word edits / total reference words, after
    :func:`normalize_transcript` on both sides. An empty hypothesis counts as all deletions."""
    import jiwer
    refs = [normalize_transcript(r) for r in references]
    hyps = [normalize_transcript(h) for h in hypotheses]
    keep = [(r, h) for r, h in zip(refs, hyps) if r]
    if not keep:
        raise ValueError("word_error_rate needs at least one non-empty reference")
    return float(jiwer.process_words([r for r, _ in keep], [h for _, h in keep]).wer)


def qa_agreement(speech_answers: list[str | None], text_answers: list[str]) -> float:
    """Fraction of questions whose spoken-question answer equals the text-question answer
    (:func:`mm.infer.normalize`: lower case, no punctuation or articles)."""
    from mm.infer import exact_match
    if not text_answers:
        raise ValueError("qa_agreement needs at least one question")
    return sum(exact_match(s, t) for s, t in zip(speech_answers, text_answers)) / len(text_answers)


def qa_answer_agreement(questions: list[str | None], speech_answers: list[str | None],
                        text_answers: list[str]) -> float:
    """Like :func:`qa_agreement`, but two answers to a built-in question (one with an answer
    key, :func:`answer_is_correct`) also agree when both are right in other words ("The capital
    of Iran is Tehran." and "... is known as Tehran."). Other questions: exact match."""
    from mm.infer import exact_match
    if not text_answers:
        raise ValueError("qa_answer_agreement needs at least one question")

    def agree(q: str | None, s: str | None, t: str) -> bool:
        if s is None:
            return False
        return exact_match(s, t) or (q is not None and bool(answer_is_correct(q, t)) and bool(answer_is_correct(q, s)))

    return sum(agree(q, s, t) for q, s, t in zip(questions, speech_answers, text_answers)) / len(text_answers)


# -- evaluation and the CPU demo ---------------------------------------------------------
TARGETS = {"speech.wer": ("<=", 0.15), "speech.qa_agreement": (">=", 0.70)}


def evaluate_speech(model, types: dict, tokenizer, sources: list[dict], *, batch_size: int = 32,
                    samples: int = 5) -> dict:
    """Per source and task (a record's own ``task``, else the source's, else ``asr``; named by
    the source's ``name``, with ``.task`` when a manifest mixes tasks, else by the task): WER
    of ``asr`` records, and for ``qa`` records (whose ``text`` is the LLM's answer to the
    question in text) the agreement of the answer to the spoken question with it: exact
    (``qa_agreement``) and by answer (``answer_agreement``, :func:`qa_answer_agreement`).

    Returns ``{name: {"wer": x | "qa_agreement": x, "answer_agreement": y, "n": n, "samples": [...]}}``.
    """
    from mm.data import load_source

    name = speech_modality_name(types)
    out: dict = {}
    for src in sources:
        src = dict(src)
        base = src.pop("name", None)
        by_task: dict[str, list[dict]] = {}
        for r in load_source(src, types):
            if "_error" not in r:
                by_task.setdefault(r.get("task") or src.get("task", "asr"), []).append(r)
        for task, recs in by_task.items():  # a manifest may mix ASR and spoken-QA records
            label = (base if len(by_task) == 1 else f"{base}.{task}") if base else task
            out[label] = _score_speech(model, types, tokenizer, name, task, recs, batch_size, samples)
    return out


def _score_speech(model, types, tokenizer, name: str, task: str, recs: list[dict], batch_size: int,
                  samples: int) -> dict:
    """WER of ASR records, or the answer agreement of spoken-QA records (see :func:`evaluate_speech`)."""
    from mm.data import _paths
    from mm.infer import answer_records

    paths = [_paths(r, name)[0] for r in recs]
    if task == "asr":
        hyps = [o["text"] for o in transcribe_files(model, types, tokenizer, paths, batch_size=batch_size)]
        refs = [r["text"] for r in recs]
        return {"wer": round(word_error_rate(refs, hyps), 4), "n": len(recs),
                "samples": [{"reference": r, "transcript": h, "voice": rec.get("voice")}
                            for r, h, rec in list(zip(refs, hyps, recs))[:samples]]}
    limit = max(24, max(len(tokenizer(r["text"])["input_ids"]) for r in recs) + 4)
    preds = answer_records(model, types, tokenizer, [{name: str(p), "task": "qa"} for p in paths],
                           batch_size=batch_size, on_error="skip", max_new_tokens=limit)
    texts, asked = [r["text"] for r in recs], [r.get("spoken") for r in recs]
    return {"qa_agreement": round(qa_agreement(preds, texts), 4),
            "answer_agreement": round(qa_answer_agreement(asked, preds, texts), 4),
            "n": len(recs), "questions": len(set(asked)),
            "samples": [{"question": r.get("spoken"), "text_answer": r["text"], "speech_answer": p,
                         "voice": r.get("voice")} for r, p in list(zip(recs, preds))[:samples]]}


def _cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_speech_demo(out_dir: Path, *, llm_spec: str = "smollm2", fast: bool = False, seed: int = 0) -> dict:
    """The speech part of ``mm demo``: the BEST-RQ encoder stage (0 steps in the demo's config:
    the encoder as initialised, with zeroed residual branches; see
    configs/demo/speech_encoder_pretrain.yaml), then encoder + adapter on ASR and spoken QA
    (configs/demo/speech_adapter.yaml), then WER and QA agreement on held-out voices (and
    held-out questions). Returns the metrics, also written to ``out_dir/speech_metrics.json``.
    ``fast``: a few steps and items (a smoke test)."""
    from mm.checkpoint import atomic_write_text
    from mm.demo import demo_config
    from mm.runs import load_run
    from mm.train import train

    t0, c0 = time.time(), _cpu()
    out_dir = Path(out_dir)
    runs = {s: out_dir / s for s in ("speech_encoder_pretrain", "speech_adapter")}
    common = [f"model.llm={llm_spec}"]
    small = ["optim.steps=3", "optim.warmup_steps=1", "log_every=1"] if fast else []
    small_ad = ["extra.ctc_only_steps=1"] if fast else []
    pre = demo_config("speech_encoder_pretrain", common + small + [f"out={runs['speech_encoder_pretrain']}"])
    ad = demo_config("speech_adapter",
                     common + small + small_ad + [f"out={runs['speech_adapter']}", f"init_from={runs['speech_encoder_pretrain']}"])
    for cfg in (pre, ad):
        cfg.seed += seed  # the training seeds only: the utterances stay the same
    if fast:
        for cfg in (pre, ad):
            cfg.data.sources = [dict(s, n=min(int(s.get("n", 1000)), 48)) for s in cfg.data.sources]
        ad.eval.sources = [dict(s, n=min(int(s.get("n", 100)), 8)) for s in ad.eval.sources]
    seconds = {}

    t = time.time()
    from mm.data import load_source
    from mm.runs import get_llm, modality_types
    get_llm(ad.model)  # load (and memoise) the frozen LLM
    types = modality_types(ad.model)
    for src in pre.data.sources + ad.data.sources + ad.eval.sources:  # synthesise (cached)
        load_source({k: v for k, v in src.items() if k != "name"}, types)
    seconds["llm_and_data"] = round(time.time() - t, 1)

    for stage, cfg in (("speech_encoder_pretrain", pre), ("speech_adapter", ad)):
        t = time.time()
        train(cfg, progress=False)
        seconds[stage] = round(time.time() - t, 1)

    t = time.time()
    model, frozen, types, _ = load_run(runs["speech_adapter"])
    ev = evaluate_speech(model, types, frozen.tokenizer, ad.eval.sources)
    seconds["eval"] = round(time.time() - t, 1)
    seconds["total"] = round(time.time() - t0, 1)
    seconds["process_cpu_total"] = round(_cpu() - c0, 1)  # wall time is inflated on a busy machine
    summaries = {s: json.loads((runs[s] / "summary.json").read_text()) for s in runs}
    asr = next((v for v in ev.values() if "wer" in v), {})
    qa = ev.get("qa_heldout", next((v for v in ev.values() if "qa_agreement" in v), {}))
    metrics = {
        "speech.wer": asr.get("wer"),
        "speech.qa_agreement": qa.get("qa_agreement"),
        "speech.qa_answer_agreement": qa.get("answer_agreement"),
        "speech.seconds": seconds,
        "speech.targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "speech.eval": ev,
        "speech.final": {s: summaries[s]["final"] for s in runs},
        "speech.bad_samples": {s: summaries[s]["bad_samples"] for s in runs},
        "speech.runs": {s: str(p) for s, p in runs.items()},
    }
    atomic_write_text(out_dir / "speech_metrics.json", json.dumps(metrics, indent=2))
    return metrics
