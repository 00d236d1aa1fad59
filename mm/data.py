"""Data: records from sources, tokenised samples, batches.

A *record* is a dict from a manifest line or a built-in source, e.g.
``{"image": "a.png", "text": "a red circle", "question": "..."}``: keys naming a modality of
the model hold file paths (or lists of paths); ``text`` is the target; ``question`` the user
text (else the modality's default prompt). Paths are resolved relative to the manifest.

Notation: b=batch, t=text tokens, n=media items per sample.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from mm.model import MediaInput
from mm.prompts import encode, mark, strip_marks


class DataError(ValueError):
    """Bad data that stops a run (one line naming the file)."""


class BadSample(ValueError):
    """One sample cannot be used; training skips and counts it."""


# -- sources -----------------------------------------------------------------------------
def read_manifest(path: str | Path) -> list[dict]:
    """JSONL manifest: one JSON object per line; relative paths resolved against its folder.
    A bad line is not fatal here: it becomes a record that fails (and is counted) later."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such manifest")
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: manifest is not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            out.append({"_error": f"{path}:{n}: not a JSON object ({str(e).splitlines()[0]})"})
            continue
        rec["_base"] = str(path.parent)
        rec["_where"] = f"{path}:{n}"
        out.append(rec)
    return out


def read_folder(path: str | Path, key: str, suffixes: tuple[str, ...]) -> list[dict]:
    """A folder of media files, each with a same-named ``.txt`` caption."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder")
    out = []
    for f in sorted(path.iterdir()):
        if f.suffix.lower() in suffixes:
            cap = f.with_suffix(".txt")
            text = cap.read_text(encoding="utf-8", errors="replace").strip() if cap.exists() else ""
            out.append({key: str(f), "text": text, "_where": str(f)})
    return out


def load_source(src: dict, types: dict) -> list[dict]:
    """Records of one data source entry of a config."""
    src = dict(src)
    kind = src.pop("type", None)
    src.pop("weight", None)
    src.pop("balance", None)  # sampling options, read by SampleStream
    place = src.pop("media", "after")
    if place not in ("before", "after"):
        raise DataError(f"data source {kind}: media must be before or after (the question), not {place!r}")
    recs = _load_source(kind, src, types)
    if place == "before":  # the media markers first, so every question token sees the media
        if not isinstance(recs, list):
            raise DataError(f"data source {kind}: media: before needs an in-memory source (not streamed shards)")
        recs = [_media_first(r, types) for r in recs]
    return recs


def _media_first(rec: dict, types: dict) -> dict:
    question = rec.get("question", rec.get("prompt"))
    if not isinstance(question, str) or "<|mm:" in question:
        return rec
    names = [n for n in types if rec.get(n) is not None]
    items = sum(len(rec[n]) if isinstance(rec[n], list) else 1 for n in names)
    if not names or items != len(names):
        return rec  # several items of one modality: the default placement
    return {**rec, "question": "".join(mark(n) for n in names) + question}


def _load_source(kind, src: dict, types: dict) -> list[dict]:
    if kind == "manifest":
        return read_manifest(src["path"])
    if kind == "folder":
        name = src.get("modality", "image")
        return read_folder(src["path"], name, types[name].suffixes)
    if kind == "easy-vqa":
        from mm.sources.easy_vqa import records
        return records(**src)
    if kind == "shards":  # WebDataset tar shards (mm/shards.py)
        from mm.shards import shard_source
        return shard_source(types=types, **src)
    for t in types.values():
        if kind in t.sources:
            return t.sources[kind](**src)
    known = ["manifest", "folder", "easy-vqa", "shards"] + [k for t in types.values() for k in t.sources]
    raise DataError(f"unknown data source type {kind!r}; known: {', '.join(known)}")


# -- samples -----------------------------------------------------------------------------
@dataclass
class Sample:
    ids: list[int]
    labels: list[int]
    media: dict[str, list[tuple[object, int]]]  # name -> [(item, position)]
    prompted: bool = True  # the user's turn has text besides the media (MediaInput.prompted)


def _paths(rec: dict, name: str) -> list[Path]:
    v = rec.get(name)
    if v is None:
        return []
    vs = v if isinstance(v, list) else [v]
    base = Path(rec.get("_base", "."))
    return [p if p.is_absolute() else base / p for p in map(Path, vs)]


def make_sample(rec: dict, *, model, types: dict, tokenizer, preprocess: dict, train: bool = True) -> Sample:
    """Record -> tokenised sample with preprocessed media. Raises BadSample."""
    where = rec.get("_where", "record")
    if "_error" in rec:
        raise BadSample(rec["_error"])
    present = [n for n in model.modalities if rec.get(n) is not None]
    text = rec.get("text")
    if train and (not isinstance(text, str) or not text.strip()):
        raise BadSample(f"{where}: missing or empty 'text'")
    if not present and train:
        raise BadSample(f"{where}: no media field (expected one of {sorted(model.modalities)})")
    media: dict[str, list] = {}
    counts: dict[str, list[int]] = {}
    for n in present:
        t, mod = types[n], model.modalities[n]
        items = []
        for p in _paths(rec, n):
            try:
                raw = t.read(p)
                item = t.preprocess(raw, mod, **preprocess.get(n, {}))
            except ValueError as e:
                raise BadSample(str(e).splitlines()[0] if str(p) in str(e) else f"{p}: {e}") from None
            items.append(item)
        media[n] = items
        if t.kind == "tokens":
            counts[n] = [t.num_tokens(it, mod) + 2 for it in items]
    question = rec.get("question")
    if question is None:
        question = rec.get("prompt")
    if question is None and len(present) > 1:
        question = ""  # several inputs and no text (e.g. an image and a spoken question)
    if question is None and present:
        t0 = types[present[0]]
        question = (t0.record_prompt(rec) if t0.record_prompt else None)
        question = t0.prompt if question is None else question
    question = "" if question is None else question
    if not isinstance(question, str):
        raise BadSample(f"{where}: 'question' must be text")
    for key, val in (("question", question), ("text", text)):  # JSON "\udce9": not encodable text
        if isinstance(val, str) and not val.isascii():
            try:
                val.encode("utf-8")
            except UnicodeEncodeError:
                raise BadSample(f"{where}: {key!r} is not valid Unicode text (unpaired surrogate)") from None
    prompted = bool(strip_marks(question).strip())
    late: list[str] = []
    if "<|mm:" not in question:  # no marker: each modality's own placement
        where = {n: model.modalities[n].placement for n in present}
        late = [n for n in present if where[n] == "before_answer" for _ in media[n]]
        marks = {p: "".join(mark(n) for n in present if where[n] == p for _ in media[n])
                 for p in ("before_question", "after_question")}
        question = marks["before_question"] + question + marks["after_question"]
    enc = encode(tokenizer, question, text if train else None, media_tokens=counts, before_answer=late)
    placed: dict[str, list] = {n: [] for n in media}
    for name, pos in enc.media:
        if name not in media or len(placed[name]) >= len(media[name]):
            raise BadSample(f"{where}: prompt marks a {name} that the record does not have")
        placed[name].append((media[name][len(placed[name])], pos))
    return Sample(ids=enc.ids, labels=enc.labels, media=placed, prompted=prompted)


# -- batches -----------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: torch.Tensor       # (b, t) left-padded
    attention_mask: torch.Tensor  # (b, t)
    labels: torch.Tensor          # (b, t), -100 where no loss
    media: dict[str, MediaInput]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     {k: v.to(device) for k, v in self.media.items()})


def _shared_prefix(samples: list[Sample]) -> int:
    """Leading tokens common to every sample and left of every media item and label."""
    first = samples[0].ids
    n = min(len(s.ids) for s in samples)
    for s in samples:
        n = min([n] + [pos for items in s.media.values() for _, pos in items]
                + [i for i, l in enumerate(s.labels) if l != -100][:1])
        k = 0
        while k < n and s.ids[k] == first[k]:
            k += 1
        n = k
    return n


def media_key(item) -> str:
    """A content key of one preprocessed media item (a tensor or a dict of them): equal keys
    mean equal encoder inputs, so a fixed encoder part gives equal outputs for them."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(item.items()) if isinstance(item, dict) else [("", item)]:
        if torch.is_tensor(t):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{name}={t!r};".encode())
    return h.hexdigest()


def collate(samples: list[Sample], *, types: dict, pad_id: int, media_keys: bool = False) -> Batch:
    """Pad a batch as ``[shared prefix][padding][rest]``: tokens common to every sample (the
    chat template's system prompt) stay column-aligned at the left, so the model computes
    them once; the rest is right-aligned, so generation appends at the same column.
    ``media_keys``: give every media item its content key (:func:`media_key`), for a
    modality's feature cache."""
    b = len(samples)
    t = max(len(s.ids) for s in samples)
    shared = _shared_prefix(samples) if b > 1 else 0
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    att = torch.zeros(b, t, dtype=torch.long)
    labels = torch.full((b, t), -100, dtype=torch.long)
    offsets = []
    for i, s in enumerate(samples):
        off = t - len(s.ids)  # padding inserted after the shared prefix
        offsets.append(off)
        ids[i, :shared] = torch.tensor(s.ids[:shared], dtype=torch.long)
        att[i, :shared] = 1
        ids[i, shared + off:] = torch.tensor(s.ids[shared:], dtype=torch.long)
        att[i, shared + off:] = 1
        labels[i, shared + off:] = torch.tensor(s.labels[shared:], dtype=torch.long)
    media = {}
    for name in sorted({n for s in samples for n in s.media}):
        n = max(len(s.media.get(name, [])) for s in samples)
        if n == 0:
            continue
        first = next(s.media[name][0][0] for s in samples if s.media.get(name))
        blank = types[name].make_empty(first)
        items, valid, pos = [], torch.zeros(b, n, dtype=torch.bool), torch.zeros(b, n, dtype=torch.long)
        for i, s in enumerate(samples):
            got = s.media.get(name, [])
            for j in range(n):
                if j < len(got):
                    items.append(got[j][0])
                    valid[i, j] = True
                    # cross-attention: token position (padding does not count); token
                    # embeddings: the column where the placeholders start
                    pos[i, j] = got[j][1] if types[name].kind == "xattn" else got[j][1] + offsets[i]
                else:
                    items.append(blank)
        prompted = (torch.tensor([s.prompted for s in samples])[:, None].expand(b, n).clone()
                    if types[name].kind == "tokens" else None)
        media[name] = MediaInput(inputs=types[name].collate(items), valid=valid, positions=pos,
                                 keys=[media_key(it) for it in items] if media_keys else None, prompted=prompted)
    return Batch(ids, att, labels, media)


def _balance_weights(recs, fields) -> list[float] | None:
    """Cumulative sampling weights that give every distinct value of ``fields`` (e.g.
    ``[question, text]``: each question-answer pair) the same share of a source's draws."""
    if not fields:
        return None
    if not isinstance(recs, list):
        raise DataError("balance: needs an in-memory source (not streamed shards)")
    fields = [fields] if isinstance(fields, str) else list(fields)
    keys = [tuple(str(r.get(f)) for f in fields) for r in recs]
    counts: dict[tuple, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return list(itertools.accumulate(1.0 / counts[k] for k in keys))


class SampleStream:
    """Deterministic batches: batch ``k`` depends only on (seed, k), so a run resumes at the
    exact data position from the step count alone. Sources are mixed by weight; samples are
    drawn with replacement. Bad samples are skipped, counted and replaced.

    ``cache_items``: keep up to this many prepared samples (``make``'s results) in memory, by
    source and record, so that small datasets seen for many epochs are decoded and
    preprocessed once (``make`` must be deterministic; streamed shards are never cached)."""

    def __init__(self, sources: list[tuple], *, make, seed: int, max_bad_fraction: float,
                 cache_items: int = 0):
        # each source: (records, weight) or (records, weight, balance fields)
        sources = [tuple(s) + (None,) * (3 - len(s)) for s in sources]
        self.sources = [(recs, w) for recs, w, _ in sources if recs]
        self._cum = [_balance_weights(recs, fields) for recs, _, fields in sources if recs]
        if not self.sources:
            raise DataError("no training records: every data source is empty")
        self.make = make
        self.seed = seed
        self.max_bad_fraction = max_bad_fraction
        self.cache_items = int(cache_items)
        self._made: dict[tuple[int, int], object] = {}
        self.seen = 0
        self.bad = 0
        self.bad_examples: list[str] = []

    @classmethod
    def from_config(cls, cfg, types: dict, make) -> "SampleStream":
        """The stream of a stage's ``data:`` section. A source may set ``weight:`` (its share
        of draws) and ``balance:`` (record fields, e.g. ``[question, text]``: each distinct
        value drawn equally often, so no answer wins by being the common one)."""
        sources = [(load_source(s, types), float(s.get("weight", 1.0)), s.get("balance")) for s in cfg.data.sources]
        return cls(sources, make=make, seed=cfg.seed, max_bad_fraction=cfg.data.max_bad_fraction,
                   cache_items=cfg.data.cache_items)

    def shard(self, rank: int, world: int) -> None:
        """Data parallelism: this process makes only slots ``rank, rank + world, ...`` of
        every global batch. Each slot has its own random stream, so the union over ranks is
        exactly the single-process batch, bad-sample replacements included."""
        self.rank, self.world = rank, world

    def batch(self, k: int, size: int) -> list[Sample]:
        """This process's part of global batch ``k`` (all of it without data parallelism)."""
        weights = [w for _, w in self.sources]
        out = []
        for slot in range(getattr(self, "rank", 0), size, getattr(self, "world", 1)):
            rng = random.Random((self.seed * 1_000_003 + k) * 65_537 + slot)
            for tries in range(1, 51):
                src = rng.choices(range(len(self.sources)), weights)[0]  # same draws as choosing the source
                recs, cum = self.sources[src][0], self._cum[src]
                i = rng.randrange(len(recs)) if cum is None else bisect.bisect_right(cum, rng.random() * cum[-1])
                # shards (mm/shards.py): a slot's first try takes the next record in stream order
                streamed = tries == 1 and hasattr(recs, "at")
                rec = recs.at(k, slot, size, self) if streamed else recs[i]
                self.seen += 1
                try:
                    out.append(self._make(rec, None if streamed else (src, i)))
                    break
                except BadSample as e:
                    self.bad += 1
                    if len(self.bad_examples) < 20:
                        self.bad_examples.append(str(e))
                    if self.seen >= 20 and self.bad / self.seen > self.max_bad_fraction:
                        raise DataError(f"{self.bad} of {self.seen} samples were bad (more than "
                                        f"{self.max_bad_fraction:.0%}); first: {self.bad_examples[0]}") from None
            else:
                raise DataError(f"could not assemble a batch: {self.bad_examples[-1]}")
        return out

    def _make(self, rec, key: tuple[int, int] | None):
        if key is not None and key in self._made:
            return self._made[key]
        sample = self.make(rec)
        if key is not None and len(self._made) < self.cache_items:
            self._made[key] = sample
        return sample
