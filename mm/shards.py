"""WebDataset tar shards: ``mm data pack`` writes them from a JSONL manifest, and the data
source ``{type: shards, path: ..., shuffle_buffer: N}`` reads them for training at scale.

A shard is a plain (uncompressed) WebDataset tar: the files of one sample share a key and
lie next to each other, ``00000007.json`` (the record's text fields: ``text``, ``question``,
``task``...) and ``00000007.image.png`` (its media, one member per file; a list becomes
``image.0.png``, ``image.1.png``). ``webdataset.WebDataset`` reads them as they are. Shards
from elsewhere (``key.jpg`` + ``key.txt``) also work: media are matched to the model's
modalities by file suffix and ``txt`` is the target text.

Reading, and why it resumes exactly. The source is an *index-based* reader: it knows each
shard's samples and their byte offsets (from ``index.json`` written by ``pack``, or by
reading the tar headers), so any sample can be read by a seek. The order in which training
sees them is a pure function of ``(seed, epoch)``: every epoch the shard order is permuted,
samples are read shard after shard, and a shuffle buffer of ``shuffle_buffer`` entries mixes
them (a seeded reservoir, run over *references*, never over the data, so replaying it to any
position is cheap). Slot ``j`` of global batch ``k`` takes stream position ``k * batch + j``
(:class:`mm.data.SampleStream` asks :meth:`ShardSource.at`), so batch ``k`` depends only on
``(seed, k)`` like every other source: a resumed run needs only its step count, no reader
state is saved, and with the default ``split_by_rank: false`` the global batch is the same
for any number of processes (each process reads only the samples of its own slots). A bad
sample is replaced by a random one of the same source (also a function of ``(seed, k)``).
Mixed with other sources by weight, a slot that draws another source leaves that position
of this one unused: each source is thinned, never repeated within an epoch.

``split_by_rank: true`` is the classic WebDataset split instead: rank ``r`` of ``w`` reads
only shards ``r, r + w, ...`` (rank and world size from ``torch.distributed`` when it is
initialised, else the ``RANK`` / ``WORLD_SIZE`` variables, else 0 / 1), its slots walk its
own shards' stream; resuming is exact for the same number of processes.

Media reach :func:`mm.data.make_sample` as files: a sample's media are extracted into a
private temporary folder just before use (path ``.../<n>/<shard>/<key>.<field>.<suffix>``,
so an error names the shard and the key), and the folder of an old sample is deleted once
``keep_extracted`` newer ones were read; everything goes when the source is garbage
collected or the process exits. Shards must be local (or mounted) seekable files.
"""

from __future__ import annotations

import bisect
import collections
import glob
import json
import os
import random
import re
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mm.data import DataError, _paths, read_manifest

__all__ = ["pack", "PackReport", "PackError", "ShardSource", "shard_source", "rank_and_world", "expand_shards",
           "SHARD_NAME", "INDEX_NAME"]

SHARD_NAME = "shard-%06d.tar"
INDEX_NAME = "index.json"
INDEX_FORMAT = "mm-shards-1"
MEDIA_KEYS = ("image", "video", "audio", "speech")  # manifest keys that always hold files
TEXT_KEYS = ("text", "question", "prompt", "task", "language", "target_language", "answer")


# -- writing -------------------------------------------------------------------------------
@dataclass
class PackReport:
    out: Path
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (file, manifest line)
    bad: list[str] = field(default_factory=list)                  # unreadable manifest lines


class PackError(DataError):
    """Packing refused (missing files or bad lines); ``report`` says which."""

    def __init__(self, message: str, report: PackReport):
        super().__init__(message)
        self.report = report


def _media_suffixes() -> set[str]:
    from mm.modalities import builtin_types
    return {s for t in builtin_types().values() for s in t.suffixes}


def media_fields(rec: dict, suffixes: set[str]) -> list[str]:
    """Keys of a manifest record that name media files: the modality names, any value with a
    media suffix, and any other string value naming an existing file next to the manifest."""
    out = []
    for k, v in rec.items():
        if k.startswith("_") or k in TEXT_KEYS:
            continue
        vs = v if isinstance(v, list) else [v]
        if not vs or not all(isinstance(x, str) and x for x in vs):
            continue
        if k in MEDIA_KEYS or all(Path(x).suffix.lower() in suffixes for x in vs) or \
                all(p.is_file() for p in _paths(rec, k)):
            out.append(k)
    return out


def pack(manifest: str | Path, out: str | Path, *, shard_size: int = 1000, skip_missing: bool = False) -> PackReport:
    """Write the records of a JSONL manifest into WebDataset shards ``out/shard-NNNNNN.tar``
    (``shard_size`` samples each) plus ``out/index.json`` (samples per shard).

    Paths are resolved relative to the manifest. Records whose files are missing, and lines
    that are not JSON objects, are reported; unless ``skip_missing`` this raises
    :class:`PackError` before anything is written, else they are skipped and counted.
    """
    import webdataset as wds

    manifest, out = Path(manifest), Path(out)
    if not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"--shard-size must be a positive number of samples, got {shard_size!r}")
    recs = read_manifest(manifest)
    report = PackReport(out=out)
    suffixes = _media_suffixes()
    plan = []
    for rec in recs:
        if "_error" in rec:
            report.bad.append(rec["_error"])
            continue
        fields = media_fields(rec, suffixes)
        missing = [str(p) for f in fields for p in _paths(rec, f) if not p.is_file()]
        if missing:
            report.missing += [(p, rec["_where"]) for p in missing]
            continue
        plan.append((rec, fields))
    skipped = len(recs) - len(plan)
    if skipped and not skip_missing:
        what = ", ".join(x for x in (f"{len(report.missing)} media files missing" if report.missing else "",
                                     f"{len(report.bad)} bad lines" if report.bad else "") if x)
        raise PackError(f"{manifest}: {what}; nothing written (--skip-missing packs the rest)", report)
    if not plan:
        raise PackError(f"{manifest}: no records to pack", report)
    if out.exists() and (any(out.glob("*.tar")) or (out / INDEX_NAME).exists()):
        raise DataError(f"{out}: already holds shards; pack into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pack-", dir=out))
    try:
        with wds.ShardWriter(str(tmp / SHARD_NAME), maxcount=shard_size, verbose=0, encoder=False,
                             mtime=0.0) as w:
            for i, (rec, fields) in enumerate(plan):
                sample = {"__key__": f"{i:08d}"}
                meta = {k: v for k, v in rec.items() if not k.startswith("_")}
                for f in fields:
                    paths = _paths(rec, f)
                    names = []
                    for j, p in enumerate(paths):
                        ext = (p.suffix[1:] or "bin").lower()
                        name = f"{f}.{j}.{ext}" if isinstance(rec[f], list) else f"{f}.{ext}"
                        sample[name] = p.read_bytes()
                        names.append(name)
                    meta[f] = names if isinstance(rec[f], list) else names[0]
                meta["_source"] = rec["_where"]
                sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
                w.write(sample)
        entries = []
        for f in sorted(tmp.glob("*.tar")):
            n = len(_scan(f))
            if n:
                os.replace(f, out / f.name)
                entries.append({"file": f.name, "samples": n, "bytes": (out / f.name).stat().st_size})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from mm.checkpoint import atomic_write_text
    atomic_write_text(out / INDEX_NAME, json.dumps({
        "format": INDEX_FORMAT, "manifest": str(manifest), "samples": len(plan), "shards": entries,
        "skipped": {"missing": [f"{p} ({w})" for p, w in report.missing], "bad": report.bad}}, indent=1))
    report.samples = len(plan)
    report.shards = [e["file"] for e in entries]
    return report


# -- reading -------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: ``torch.distributed`` when initialised, else
    the ``RANK`` / ``WORLD_SIZE`` environment variables (torchrun sets them), else 0 / 1."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DataError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                        "not integers") from None
    if not 0 <= rank < world:
        raise DataError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world


def expand_shards(path: str | Path) -> list[Path]:
    """A folder (its ``*.tar``), a brace pattern ``d/shard-{000000..000009}.tar``, a glob,
    or one file -> the shard files, sorted. Raises DataError naming what is missing."""
    import braceexpand

    s = str(path)
    p = Path(s)
    if p.is_dir():
        files = sorted(p.glob("*.tar"))
        if not files:
            raise DataError(f"{p}: folder holds no .tar shards")
        return files
    names = list(braceexpand.braceexpand(s))
    files: list[Path] = []
    missing = []
    for n in names:
        if glob.has_magic(n):
            files += sorted(Path(x) for x in glob.glob(n))
        elif Path(n).is_file():
            files.append(Path(n))
        else:
            missing.append(n)
    if missing:
        raise DataError(f"{s}: {len(missing)} of {len(names)} shard files missing, e.g. {missing[0]}")
    if not files:
        raise DataError(f"{s}: no shard files match")
    for f in files:
        if f.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            raise DataError(f"{f}: compressed shards cannot be read by seeking; use plain .tar")
    return sorted(dict.fromkeys(files))


_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # WebDataset's key / extension split


def _scan(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of a shard in order: ``[(key, {extension: (offset, size)})]``."""
    out: list[tuple[str, dict]] = []
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tf:
            for ti in tf:
                if not ti.isreg():
                    continue
                m = _KEY.match(ti.name)
                if m is None or Path(m.group(1)).name.startswith("__"):
                    continue
                key, ext = m.group(1), m.group(2)
                if ti.offset_data + ti.size > size:
                    raise DataError(f"{path}: truncated shard (member {ti.name} ends past the end of the file)")
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                out[-1][1][ext] = (ti.offset_data, ti.size)
            end = tf.offset  # where the end-of-archive marker must start
        with open(path, "rb") as f:
            f.seek(end)
            if f.read(512) != bytes(512):  # cut at a member boundary: tar itself cannot tell
                raise DataError(f"{path}: truncated shard (no end-of-archive marker after {end} bytes)")
    except tarfile.TarError as e:
        raise DataError(f"{path}: not a readable tar shard ({str(e).splitlines()[0] if str(e) else 'empty'})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror or e})") from None
    return out


def _read_index(folder: Path) -> dict[str, dict]:
    f = folder / INDEX_NAME
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        if data.get("format") == INDEX_FORMAT:
            return {e["file"]: e for e in data["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {}


class ShardSource(Sequence):
    """Records of WebDataset shards, read by seeking.

    ``source[i]`` is the ``i``-th sample in file order (random access; evaluation iterates
    this way); :meth:`at` is the training order (shuffled per epoch, exact to resume).
    """

    def __init__(self, files: list[Path], *, types: dict | None = None, shuffle_buffer: int = 1000,
                 split_by_rank: bool = False, keep_extracted: int = 64):
        self.split_by_rank = bool(split_by_rank)
        if self.split_by_rank:
            rank, world = rank_and_world()
            if len(files) < world:
                raise DataError(f"{files[0].parent}: {len(files)} shards cannot be split over {world} ranks "
                                "(split_by_rank needs at least one shard per rank)")
            files = files[rank::world]
        self.files = files
        self.types = types or {}
        self.shuffle_buffer = int(shuffle_buffer)
        self._indexes: collections.OrderedDict[int, list] = collections.OrderedDict()
        counts = []
        known: dict[Path, dict] = {}
        for f in files:
            if f.parent not in known:
                known[f.parent] = _read_index(f.parent)
            e = known[f.parent].get(f.name)
            try:
                fresh = e is not None and e.get("bytes") == f.stat().st_size
            except OSError as err:
                raise DataError(f"{f}: cannot read shard ({err.strerror})") from None
            counts.append(int(e["samples"]) if fresh else len(self._index(len(counts), f)))
        self.counts = counts
        self.starts = [0]
        for c in counts:
            self.starts.append(self.starts[-1] + c)
        self._handles: collections.OrderedDict[int, object] = collections.OrderedDict()
        self._cursor = None
        self._tmp = Path(tempfile.mkdtemp(prefix="mm-shards-"))
        self._extracted: collections.deque[Path] = collections.deque()
        self._keep = max(1, int(keep_extracted))
        self._n = 0
        self._finalizer = weakref.finalize(self, _cleanup, self._tmp, self._handles)

    # -- sequence in file order --
    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        s = bisect.bisect_right(self.starts, i) - 1
        return self._record(s, i - self.starts[s])

    # -- training order --
    def at(self, k: int, slot: int, size: int, stream) -> dict:
        """The record for slot ``slot`` of global batch ``k`` (``size`` slots), for a
        :class:`mm.data.SampleStream` (its ``seed``, and ``rank`` / ``world`` when it makes
        only some slots)."""
        if self.split_by_rank:  # this process's slots walk this process's shards
            mine = range(getattr(stream, "rank", 0), size, getattr(stream, "world", 1))
            pos = k * len(mine) + mine.index(slot)
        else:
            pos = k * size + slot
        return self.ordered(pos, stream.seed)

    def ordered(self, pos: int, seed: int) -> dict:
        """The record at stream position ``pos`` (0, 1, 2, ... over all epochs)."""
        s, m = self.position(pos, seed)
        return self._record(s, m)

    def position(self, pos: int, seed: int) -> tuple[int, int]:
        """(shard, sample) at stream position ``pos``: a function of (seed, pos) only.
        Consecutive positions cost O(1); a jump (resume) replays the epoch's references."""
        epoch, i = divmod(int(pos), len(self))
        c = self._cursor
        if c is None or c[0] != (seed, epoch) or c[1] > i:
            c = self._cursor = [(seed, epoch), 0, self._epoch_order(seed, epoch)]
        while c[1] < i:
            next(c[2])
            c[1] += 1
        c[1] += 1
        return next(c[2])

    def _epoch_order(self, seed: int, epoch: int):
        rng = random.Random(f"mm-shards:{seed}:{epoch}")
        shards = list(range(len(self.files)))
        rng.shuffle(shards)
        n = self.shuffle_buffer
        buf: list[tuple[int, int]] = []
        for s in shards:
            for m in range(self.counts[s]):
                if n <= 1:
                    yield s, m
                elif len(buf) < n:
                    buf.append((s, m))
                else:
                    j = rng.randrange(n)
                    yield buf[j]
                    buf[j] = (s, m)
        rng.shuffle(buf)
        yield from buf

    # -- reading one sample --
    def _index(self, s: int, f: Path | None = None) -> list:
        if s in self._indexes:
            self._indexes.move_to_end(s)
            return self._indexes[s]
        idx = _scan(f or self.files[s])
        self._indexes[s] = idx
        while len(self._indexes) > 32:
            self._indexes.popitem(last=False)
        return idx

    def _read(self, s: int, span: tuple[int, int]) -> bytes:
        fh = self._handles.get(s)
        if fh is None:
            fh = self._handles[s] = open(self.files[s], "rb")
            while len(self._handles) > 8:
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(s)
        fh.seek(span[0])
        data = fh.read(span[1])
        if len(data) != span[1]:
            raise OSError(f"read {len(data)} of {span[1]} bytes (truncated shard)")
        return data

    def _record(self, s: int, m: int) -> dict:
        shard = self.files[s]
        try:
            idx = self._index(s)
        except DataError as e:
            return {"_error": str(e), "_where": str(shard)}
        if m >= len(idx):
            return {"_error": f"{shard}: holds {len(idx)} samples but its index.json says {self.counts[s]} "
                              "(the shard was replaced or truncated)", "_where": str(shard)}
        key, members = idx[m]
        where = f"{shard}:{key}"
        try:
            meta = self._meta(where, s, members)
            rec = {k: v for k, v in meta.items() if k != "_source"}
            media = self._media_fields(meta, members)
            if media:
                folder = self._new_folder() / shard.name
                folder.mkdir(parents=True)
                for f, exts in media.items():
                    paths = []
                    for ext in exts:
                        p = folder / f"{Path(key).name}.{ext}"
                        p.write_bytes(self._read(s, members[ext]))
                        paths.append(str(p))
                    rec[f] = paths if isinstance(meta.get(f), list) or len(paths) > 1 else paths[0]
        except (OSError, ValueError) as e:
            return {"_error": f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", "_where": where}
        rec["_where"] = where + (f" (from {meta['_source']})" if isinstance(meta.get("_source"), str) else "")
        return rec

    def _meta(self, where: str, s: int, members: dict) -> dict:
        if "json" in members:
            try:
                meta = json.loads(self._read(s, members["json"]).decode("utf-8"))
            except UnicodeDecodeError:
                raise ValueError("json member is not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"json member is not valid JSON ({e.msg})") from None
            if not isinstance(meta, dict):
                raise ValueError("json member is not a JSON object")
            return meta
        meta = {}
        for ext in ("txt", "text", "caption"):
            if ext in members:
                try:
                    meta["text"] = self._read(s, members[ext]).decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise ValueError(f"{ext} member is not UTF-8 text") from None
                break
        return meta

    def _media_fields(self, meta: dict, members: dict) -> dict[str, list[str]]:
        """field -> member extensions: named by the sample's JSON (as ``pack`` writes), else
        matched to the model's modalities by suffix (plain WebDataset shards)."""
        out: dict[str, list[str]] = {}
        for k, v in meta.items():
            vs = v if isinstance(v, list) else [v]
            if vs and all(isinstance(x, str) and x in members and x not in ("json", "txt") for x in vs):
                out[k] = vs
        if out or "json" in members:
            return out
        for ext in members:
            suffix = "." + ext.rsplit(".", 1)[-1].lower()
            for name, t in self.types.items():
                if suffix in getattr(t, "suffixes", ()):
                    out.setdefault(name, []).append(ext)
                    break
        return out

    def _new_folder(self) -> Path:
        """A fresh folder for one sample's media; the oldest beyond ``keep_extracted`` goes."""
        self._n += 1
        d = self._tmp / f"{self._n:08d}"
        self._extracted.append(d)
        while len(self._extracted) > self._keep:
            shutil.rmtree(self._extracted.popleft(), ignore_errors=True)
        return d

    def close(self) -> None:
        self._finalizer()


def _cleanup(tmp: Path, handles: dict) -> None:
    for fh in handles.values():
        fh.close()
    handles.clear()
    shutil.rmtree(tmp, ignore_errors=True)


def shard_source(*, types: dict | None = None, path: str | None = None, shuffle_buffer: int = 1000,
                 split_by_rank: bool = False, **unknown) -> ShardSource:
    """Data source ``{type: shards, path: DIR | PATTERN, shuffle_buffer: N, split_by_rank: false}``."""
    if unknown:
        raise DataError(f"shards source: unknown option(s) {', '.join(sorted(unknown))} "
                        "(known: path, shuffle_buffer, split_by_rank, weight)")
    if not path:
        raise DataError("shards source: needs a path (folder, file, glob or {000000..000009} pattern)")
    if not isinstance(shuffle_buffer, int) or isinstance(shuffle_buffer, bool) or shuffle_buffer < 0:
        raise DataError(f"shards source {path}: shuffle_buffer must be a whole number >= 0, got {shuffle_buffer!r}")
    return ShardSource(expand_shards(path), types=types, shuffle_buffer=shuffle_buffer, split_by_rank=split_by_rank)
