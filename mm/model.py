"""MultimodalLM: a frozen Hugging Face causal LM plus modality encoders and adapters.

Notation: b=batch, t=text tokens, n=media items per sample, m=media tokens, d=LLM width.

The LLM object is never modified: no parameter is renamed, wrapped or replaced. Cross-
attention adapters run through forward pre-hooks on the chosen decoder layers; the media
states reach them as a keyword argument that transformers 5.x passes from the model's
forward down to every decoder layer. Token-embedding modalities (speech) write their
embeddings into ``inputs_embeds`` at placeholder positions. So ``model.llm.state_dict()``
is the original checkpoint, key for key and bit for bit.
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mm.modality import Modality

MEDIA_KWARG = "mm_media"


@dataclass
class MediaInput:
    """One modality's inputs for a batch.

    Attributes:
        inputs: what the modality's encoder takes for all (b * n) items, e.g. pixels.
        valid: (b, n) bool, which items exist (samples may have fewer than n).
        positions: (b, n) long. Cross-attention: the first text position that sees the item.
            Token embeddings: the position of the item's first placeholder token.
        keys: optional, one content key per item (b * n, :func:`mm.data.media_key`): with
            them a modality's feature cache can reuse a fixed encoder part's output.
        prompted: optional (b, n) bool, token embeddings: whether the item's user turn has
            text besides the media (a task prompt such as ASR's); a read-out modality with
            ``readout_blanks: prompted`` shows blank frames only to those. None = all have.
    """

    inputs: object
    valid: torch.Tensor
    positions: torch.Tensor
    keys: list | None = None
    prompted: torch.Tensor | None = None

    def to(self, device) -> "MediaInput":
        move = (lambda x: x.to(device) if torch.is_tensor(x) else
                {k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()} if isinstance(x, dict) else x)
        return MediaInput(move(self.inputs), self.valid.to(device), self.positions.to(device), self.keys,
                          None if self.prompted is None else self.prompted.to(device))


@dataclass
class CrossMedia:
    """Encoded media of one cross-attention modality, ready for every adapter layer."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer index -> (k, v), each (b, k, m, c)
    start: torch.Tensor  # (b, m) first text position that sees each media token
    valid: torch.Tensor  # (b, m) bool
    _mask_cache: dict = field(default_factory=dict)
    _row_only: bool | None = None

    def mask(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(b, t, m) bool: text position sees media token. Memoised per call's positions."""
        key = (position_ids.data_ptr(), tuple(position_ids.shape))
        if key not in self._mask_cache:
            self._mask_cache.clear()
            pos = position_ids.expand(self.start.shape[0], -1)  # (b, t)
            self._mask_cache[key] = (pos[:, :, None] >= self.start[:, None, :]) & self.valid[:, None, :]
        return self._mask_cache[key]

    @property
    def row_only(self) -> bool:
        """True when no media token is padding and all of a sample's media tokens become
        visible at the same position: a text position then sees all of them or none."""
        if self._row_only is None:
            self._row_only = bool(self.valid.all()) and bool((self.start == self.start[:, :1]).all())
        return self._row_only

    def attn_mask(self, position_ids: torch.Tensor) -> torch.Tensor:
        """What the adapters take: :meth:`mask`, or the same as (b, t, 1) when
        :attr:`row_only` (attention then needs no key mask). Memoised like :meth:`mask`."""
        if not self.row_only:
            return self.mask(position_ids)
        key = ("row", position_ids.data_ptr(), tuple(position_ids.shape))
        if key not in self._mask_cache:
            self._mask_cache.clear()
            pos = position_ids.expand(self.start.shape[0], -1)  # (b, t)
            self._mask_cache[key] = pos[:, :, None] >= self.start[:, None, :1]
        return self._mask_cache[key]


def default_positions(input_ids: torch.Tensor, attention_mask, cache) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding aware)."""
    past = cache.get_seq_length() if cache is not None else 0
    if attention_mask is not None and past == 0:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (b, t)
    return torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]  # (1, t)


class _RowCache:
    """Values computed by the frozen LLM from text alone, looked up by token tuples. Up to
    ``max_rows`` entries are kept (a full cache stops adding; what it cannot keep is still
    computed, every time). Values come from earlier batches of other shapes, so they match a
    fresh computation up to float rounding, not bit for bit: off unless a run asks for it."""

    def __init__(self, max_rows: int):
        self.max_rows = int(max_rows)
        self.rows: dict[tuple, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def put(self, key: tuple, value: torch.Tensor) -> None:
        if key in self.rows or len(self.rows) < self.max_rows:
            self.rows[key] = value

    def count(self, looked_up: int, missed: int) -> None:
        self.hits += looked_up - missed
        self.misses += missed

    def stats(self) -> dict:
        return {"rows": len(self.rows), "row_hits": self.hits, "row_misses": self.misses}


def _row_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple]:
    """Each row's tokens where the mask is set, as a tuple (a cache key)."""
    return [tuple(i for i, k in zip(ids, keep) if k)
            for ids, keep in zip(input_ids.tolist(), attention_mask.tolist())]


class TrunkCache(_RowCache):
    """Hidden states of the frozen LLM's layers below the lowest cross-attention layer, kept
    per text row and reused in later steps (``trunk_cache:`` rows).

    Below that layer no adapter acts, so a row's hidden states there are a function of its
    tokens alone (the LLM is frozen): a row seen before need not run those layers again. On
    small-vocabulary data (templated captions and questions, many epochs) most rows repeat and
    a step runs only the upper layers for them. A row is looked up by that layer's index and
    its tokens; its value is the hidden states of all of them (a batch uses those right of its
    first media column). New rows run the lower layers once, whole and without gradients.
    """


class PrefixCache(_RowCache):
    """Key/value states of text-only prompt prefixes, kept across batches (``prefix_cache:``
    entries).

    Text left of a batch's first media column depends on the text alone (the LLM is frozen
    and no adapter acts there), so its keys and values are a function of its tokens: a
    prefix seen before need not run again. A batch's prefix has two parts (see
    :meth:`MultimodalLM.run`): the columns every row shares (a system prompt), kept once,
    and each row's own tokens after them (its question), kept per distinct row. On
    templated data (a few hundred distinct questions, many epochs) a warm step runs no
    prefix at all. Each entry is one tensor ``(tokens, layers, 2, kv heads, head dim)``.
    """


_SHARED_CACHES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def shared_text_cache(llm: nn.Module, kind: type[_RowCache], max_rows: int) -> _RowCache:
    """The process's one cache of ``kind`` for this frozen LLM object, holding at least
    ``max_rows``. Its values depend only on the LLM's weights and the text, so every model
    built on the same (cached) LLM shares it: a later stage and the evaluation after it
    start warm. It lives as long as the LLM object."""
    caches = _SHARED_CACHES.setdefault(llm, {})
    w = next(llm.parameters())
    cache = caches.get(kind)
    if cache is None or getattr(cache, "where", None) != (w.device, w.dtype):
        # new, or filled while the LLM was on another device or in another dtype
        cache = caches[kind] = kind(max_rows)
        cache.where = (w.device, w.dtype)
    cache.max_rows = max(cache.max_rows, int(max_rows))
    return cache


def _stack_kv(cache) -> torch.Tensor | None:
    """A cache's keys and values as one ``(b, t, layers, 2, kv heads, head dim)`` tensor, or
    None when its layers differ in shape (then the prefix is not cached)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(l, "keys", None) is None for l in layers):
        return None
    shape = layers[0].keys.shape
    if any(l.keys.shape != shape or l.values.shape != shape for l in layers):
        return None
    kv = torch.stack([torch.stack([l.keys, l.values], 1) for l in layers], 1)  # (b, L, 2, k, t, c)
    return kv.permute(0, 4, 1, 2, 3, 5)  # (b, t, L, 2, k, c)


class _TrunkOutput(nn.Module):
    """Stands in for the first decoder layer: returns the cached trunk output."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden.to(hidden_states.dtype)


class _Skip(nn.Module):
    """Stands in for the other trunk layers: passes the hidden states through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def mask_unused_placeholders(attention_mask: torch.Tensor, tokens: dict) -> None:
    """Set ``attention_mask`` (b, t) to 0, in place, at the placeholder columns of
    token-embedding media that their embeddings do not fill (``tokens``: from
    :meth:`MultimodalLM.encode_media`): the sequence then reads as if those columns were not
    there (positions count only unmasked columns)."""
    for _, emask, mi, width in tokens.values():
        used = emask.sum(-1)  # (b, n)
        for bi, ni in (mi.valid & (used < width)).nonzero().tolist():
            p = int(mi.positions[bi, ni])
            attention_mask[bi, p + int(used[bi, ni]):p + int(width[bi, ni])] = 0


class MultimodalLM(nn.Module):
    """A frozen causal LM with modalities attached.

    Args:
        llm: a transformers decoder-only causal LM; it must already be frozen.
        modalities: name -> :class:`Modality` (encoder + adapter).
    """

    def __init__(self, llm: nn.Module, modalities: dict[str, Modality] | None = None):
        super().__init__()
        self.llm = llm
        self.modalities = nn.ModuleDict(modalities or {})
        self.decoder = llm.get_decoder()
        self.layers = self.decoder.layers
        params = inspect.signature(self.decoder.forward).parameters
        # transformers renamed past_key_values -> cache (5.2x); accept both.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._hooks = []
        # Several models may wrap one (cached) LLM, each with hooks on its layers: media go
        # under a per-model keyword, so a model's hooks only ever see its own media.
        self._media_kw = f"{MEDIA_KWARG}_{id(self)}"
        self.share_prefix = True      # compute text-only prefixes once, without gradients
        self.checkpoint_xattn = False  # non-reentrant activation checkpointing of adapters
        self.trunk_cache: TrunkCache | None = None  # reuse of frozen lower-layer states (training)
        self.prefix_cache: PrefixCache | None = None  # reuse of text-only prefix keys/values
        self.kv_projections = 0  # counts project_kv calls (tests prove K/V are made once)
        for name, mod in self.modalities.items():
            self._check_modality(name, mod)
        self._install_hooks()

    # -- structure -------------------------------------------------------------------
    def _check_modality(self, name: str, mod: Modality) -> None:
        n = len(self.layers)
        if mod.kind == "xattn":
            bad = [i for i in mod.layer_indices if not 0 <= i < n]
            if bad:
                raise ValueError(f"modality {name}: adapter layers {bad} outside the LLM's 0..{n - 1}")

    def add_modality(self, name: str, mod: Modality) -> None:
        self._check_modality(name, mod)
        self.modalities[name] = mod
        self._install_hooks()

    def _install_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for i in sorted({i for m in self.modalities.values() if m.kind == "xattn" for i in m.layer_indices}):
            self._hooks.append(self.layers[i].register_forward_pre_hook(self._make_hook(i), with_kwargs=True))

    def _make_hook(self, index: int):
        ref = weakref.ref(self)  # a dropped model's hooks stay behind inert, not keeping it alive

        def hook(module, args, kwargs):
            me = ref()
            media = kwargs.pop(me._media_kw, None) if me is not None else None
            if not media:
                return args, kwargs
            if args:
                x, rest = args[0], args[1:]
            else:
                x, rest = kwargs.pop("hidden_states"), ()
            pos = kwargs.get("position_ids")
            for name, state in media.items():
                if not isinstance(state, CrossMedia) or index not in state.kv:
                    continue
                x = me.modalities[name].xattn[str(index)](x, state.kv[index], state.attn_mask(pos))
            return (x, *rest), kwargs
        return hook

    def train(self, mode: bool = True):
        super().train(mode)
        self.llm.eval()  # the frozen LLM never runs dropout or anything train-specific
        return self

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    # -- media -----------------------------------------------------------------------
    def encode_media(self, media: dict[str, MediaInput] | None, batch: int) -> tuple[dict, dict]:
        """Run the encoders once. Returns (cross-attention states, token embeddings)."""
        cross, tokens = {}, {}
        for name, mi in (media or {}).items():
            mod = self._modality(name)
            n = mi.valid.shape[1]
            if n == 0 or not bool(mi.valid.any()):
                continue
            feats, fmask = mod.encode(mi.inputs, mi.keys)  # (b*n, m, e), (b*n, m)
            m = feats.shape[1]
            if mod.kind == "xattn":
                feats = feats.reshape(batch, n * m, -1)
                valid = (fmask.reshape(batch, n, m) & mi.valid[:, :, None]).reshape(batch, n * m)
                start = mi.positions[:, :, None].expand(batch, n, m).reshape(batch, n * m)
                kv = {}
                for i, layer in mod.xattn.items():
                    kv[int(i)] = layer.project_kv(feats)
                    self.kv_projections += 1
                cross[name] = CrossMedia(kv=kv, start=start, valid=valid)
            else:
                prompted = None if mi.prompted is None else mi.prompted.reshape(-1)
                emb, emask, width = mod.embed(feats, fmask, self.llm.get_input_embeddings().weight,
                                              prompted)  # (b*n, m2 + 2, d), (b*n, m2 + 2), (b*n,)
                tokens[name] = (emb.reshape(batch, n, *emb.shape[1:]), emask.reshape(batch, n, -1), mi,
                                width.reshape(batch, n))
        return cross, tokens

    def _embed(self, input_ids: torch.Tensor, tokens: dict, column_offset: int = 0) -> torch.Tensor:
        emb = self.llm.get_input_embeddings()(input_ids)  # (b, t, d)
        if not tokens:
            return emb
        emb = emb.clone()
        for name, (e, emask, mi, _) in tokens.items():
            for bi, ni in mi.valid.nonzero().tolist():
                k = int(emask[bi, ni].sum())
                p = int(mi.positions[bi, ni]) - column_offset
                if p < 0:
                    raise ValueError("token-embedding media must lie right of the shared text prefix")
                emb[bi, p:p + k] = e[bi, ni, :k].to(emb.dtype)
        return emb

    # -- forward ---------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask=None, position_ids=None,
                      media: dict[str, MediaInput] | None = None, cache=None, encoded=None,
                      use_cache: bool = False, column_offset: int = 0):
        """Run the LLM with media. Returns (last hidden states (b, t, d), cache).

        ``column_offset``: column of ``input_ids[:, 0]`` in the full sequence (token-embedding
        media positions are columns of the full sequence).
        """
        b = input_ids.shape[0]
        cross, tokens = encoded if encoded is not None else self.encode_media(media, b)
        kwargs = {self._cache_kw: cache, "use_cache": use_cache}
        if cross:
            kwargs[self._media_kw] = cross
        if position_ids is None:
            position_ids = default_positions(input_ids, attention_mask, cache)
        if tokens:
            out = self.decoder(inputs_embeds=self._embed(input_ids, tokens, column_offset),
                               attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        else:
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, **kwargs)
        return out.last_hidden_state, getattr(out, self._cache_kw, None)

    def new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.llm.config)

    def first_media_column(self, attention_mask: torch.Tensor, media: dict[str, MediaInput] | None) -> int:
        """The first column at which any row has media: everything left of it is text only."""
        t = attention_mask.shape[1]
        first = t
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (b, t)
        for name, mi in (media or {}).items():
            if not bool(mi.valid.any()):
                continue
            if self.modalities[name].kind == "xattn":  # positions -> first column with that position
                seen = (positions[:, None, :] >= mi.positions[:, :, None]) & (attention_mask[:, None, :] > 0)
                col = seen.long().argmax(-1)  # (b, n)
            else:
                col = mi.positions
            first = min(first, int(col[mi.valid].min()))
        return first

    def _modality(self, name: str):
        if name not in self.modalities:
            raise KeyError(f"no modality {name!r} in this model (have: {sorted(self.modalities)})")
        return self.modalities[name]

    def start_column(self, attention_mask: torch.Tensor, media: dict[str, MediaInput] | None,
                     share_prefix: bool | None = None) -> int:
        """The column from which :meth:`run` computes with media and gradients (0 without
        prefix sharing or media). Reads the masks on the host: on an accelerator a sync, so
        it is taken before any of a step's work is queued."""
        if share_prefix is None:
            share_prefix = self.share_prefix
        for name in media or {}:
            self._modality(name)
        has_media = any(bool(mi.valid.any()) for mi in (media or {}).values())
        t = attention_mask.shape[1]
        return min(self.first_media_column(attention_mask, media), t - 1) if share_prefix and has_media else 0

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
            media: dict[str, MediaInput] | None = None, use_cache: bool = False, share_prefix: bool | None = None,
            start: int | None = None):
        """Hidden states for a padded batch, computing the text-only prefix cheaply.

        Text left of the first media depends on the text alone (the LLM is frozen and no
        adapter acts there), so it runs without gradients through the KV cache: columns that
        are the same in every row (a system prompt) once for the whole batch, the rest once
        per distinct row. Only the columns from the first media on run with media and
        gradients. Batches are laid out ``[shared prefix][padding][rest]`` by
        :func:`mm.data.collate` so that the shared part is column-aligned. With
        :attr:`prefix_cache` set, prefixes seen in earlier batches are not run again.

        Placeholder columns that a read-out left unused (speech read without its blank frames,
        ``readout_blanks``) are masked out in ``attention_mask`` itself, so that a caller
        continuing the sequence (generation) sees them masked too.

        Returns (hidden states of columns ``start..t``, cache, start, encoded media).
        ``start``: :meth:`start_column`'s answer when the caller has it already.
        """
        b, t = input_ids.shape
        # with no media at all, one plain prefill: exactly what the base model computes
        p = self.start_column(attention_mask, media, share_prefix) if start is None else start
        encoded = self.encode_media(media, b)
        mask_unused_placeholders(attention_mask, encoded[1])
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (b, t)
        cache = self.new_cache() if (use_cache or p > 0) else None
        if p > 0:
            same = ((input_ids == input_ids[:1]) & (attention_mask == 1)).all(0)  # (t,)
            shared = int(same[:p].long().cumprod(0).sum()) if b > 1 else p
            with torch.no_grad():
                cached = (self._cached_prefix(input_ids, attention_mask, positions, p, shared)
                          if self.prefix_cache is not None else None)
                cache = cached if cached is not None else self._prefix(input_ids, attention_mask, positions,
                                                                       p, shared, cache)

        def rest():
            return self.hidden_states(input_ids[:, p:], attention_mask=attention_mask,
                                      position_ids=positions[:, p:], cache=cache,
                                      use_cache=use_cache, encoded=encoded, column_offset=p)

        lowest = min((i for name in encoded[0] for i in self.modalities[name].layer_indices), default=0)
        if self.trunk_cache is not None and not use_cache and not encoded[1] and lowest > 0:
            h, cache = self._run_with_trunk_cache(rest, input_ids, attention_mask, p, lowest)
        else:
            h, cache = rest()
        return h, cache, p, encoded

    def _text_kv(self, input_ids, attention_mask, positions, cache):
        """Run text-only columns through the LLM into ``cache`` (no media, no adapter acts)."""
        return self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=positions,
                                  cache=cache, use_cache=True, encoded=({}, {}))[1]

    def _prefix(self, input_ids, attention_mask, positions, p: int, shared: int, cache):
        """The KV cache of columns ``0..p`` (text only): the ``shared`` columns once, the rest
        once per distinct row."""
        b = input_ids.shape[0]
        if shared:
            cache = self._text_kv(input_ids[:1, :shared], attention_mask[:1, :shared], positions[:1, :shared], cache)
        if p > shared:
            rows = torch.cat([input_ids[:, shared:p], attention_mask[:, shared:p]], dim=1)
            uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
            n, w = uniq.shape[0], p - shared
            full = torch.cat([attention_mask.new_ones(n, shared), uniq[:, w:]], dim=1)
            if shared and n > 1:
                cache.batch_repeat_interleave(n)
            cache = self._text_kv(uniq[:, :w], full, (full.cumsum(-1) - 1).clamp(min=0)[:, shared:], cache)
            if n != b or not torch.equal(inverse, torch.arange(b, device=inverse.device)):
                cache.reorder_cache(inverse)
        elif b > 1:
            cache.batch_repeat_interleave(b)
        return cache

    def _cached_prefix(self, input_ids, attention_mask, positions, p: int, shared: int):
        """The KV cache of columns ``0..p`` (text only) from :attr:`prefix_cache`, running
        only the parts not cached yet; None when this LLM's cache cannot be kept that way."""
        pc = self.prefix_cache
        b = input_ids.shape[0]
        head = tuple(input_ids[0, :shared].tolist())
        head_kv = None
        if shared:
            missing = (head,) not in pc.rows
            pc.count(1, int(missing))
            if missing:
                kv = _stack_kv(self._text_kv(input_ids[:1, :shared], attention_mask[:1, :shared],
                                             positions[:1, :shared], self.new_cache()))
                if kv is None:
                    return None
                pc.put((head,), kv[0])
            head_kv = pc.rows.get((head,))
            if head_kv is None:  # the cache is full
                return None
        if p == shared:
            own = head_kv[None].expand(b, *head_kv.shape)
            return self._cache_from_kv(own)
        valid = attention_mask[:, shared:p].bool()  # (b, w) the rows' own prefix tokens
        keys = [(head, k) for k in _row_keys(input_ids[:, shared:p], valid)]
        todo = {}  # each missing prefix once: key -> a row that has it
        for r, k in enumerate(keys):
            if k not in pc.rows and k not in todo:
                todo[k] = r
        pc.count(b, len(todo))
        fresh = {}
        if todo:
            idx = torch.tensor(list(todo.values()), device=input_ids.device)
            n = len(idx)
            c = self.new_cache()
            if shared:
                c = self._cache_from_kv(head_kv[None].expand(n, *head_kv.shape))
            kv = _stack_kv(self._text_kv(input_ids[idx, shared:p], attention_mask[idx, :p],
                                         positions[idx, shared:p], c))
            if kv is None:
                return None
            for j, k in enumerate(todo):
                fresh[k] = kv[j, shared:][valid[idx[j]]].clone()
                pc.put(k, fresh[k])
        rows = [fresh[k] if k in fresh else pc.rows[k] for k in keys]
        own = rows[0].new_zeros(b, p - shared, *rows[0].shape[1:])  # (b, w, L, 2, k, c)
        own[valid] = torch.cat(rows, 0)
        if shared:
            own = torch.cat([head_kv[None].expand(b, *head_kv.shape), own], 1)
        return self._cache_from_kv(own)

    def _cache_from_kv(self, kv: torch.Tensor):
        """A KV cache holding ``kv`` (b, t, layers, 2, kv heads, head dim)."""
        kv = kv.permute(2, 3, 0, 4, 1, 5)  # (L, 2, b, k, t, c)
        cache = self.new_cache()
        for li in range(kv.shape[0]):
            cache.update(kv[li, 0].contiguous(), kv[li, 1].contiguous(), li)
        return cache

    def _run_with_trunk_cache(self, rest, input_ids, attention_mask, p: int, lowest: int):
        """``rest()`` with layers ``0..lowest-1`` replaced by cached hidden states; rows not
        yet cached run those layers first (whole rows, without gradients) and are cached."""
        tc = self.trunk_cache
        keys = [(lowest, k) for k in _row_keys(input_ids, attention_mask)]
        counts = attention_mask[:, p:].sum(-1).tolist()  # each row's tokens from column p on
        miss = [i for i, k in enumerate(keys) if k not in tc.rows or len(tc.rows[k]) < counts[i]]
        tc.count(len(keys), len(miss))
        todo = list({keys[i]: i for i in reversed(miss)}.values())  # each missing row once
        fresh = {}
        if todo:
            for i, h in zip(todo, self._trunk(input_ids[todo], attention_mask[todo], lowest)):
                fresh[keys[i]] = h
                tc.put(keys[i], h)
        valid = attention_mask[:, p:].bool()  # (b, t - p)
        rows = [fresh.get(k, tc.rows.get(k)) for k in keys]
        h0 = rows[0].new_zeros(*valid.shape, rows[0].shape[-1])
        for i, (h, n) in enumerate(zip(rows, counts)):
            if n:
                h0[i, valid[i]] = h[len(h) - n:]
        with self._decoder_layers([_TrunkOutput(h0)] + [_Skip()] * (lowest - 1) + list(self.layers[lowest:])):
            return rest()

    @torch.no_grad()
    def _trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lowest: int) -> list[torch.Tensor]:
        """Input hidden states of layer ``lowest`` for whole rows: one (valid tokens, d) per row."""
        seen = {}

        def grab(module, args, output):
            seen["h"] = output[0] if isinstance(output, tuple) else output

        handle = self.layers[lowest - 1].register_forward_hook(grab)
        try:
            with self._decoder_layers(list(self.layers[:lowest])):
                self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=(attention_mask.long().cumsum(-1) - 1).clamp(min=0), use_cache=False)
        finally:
            handle.remove()
        keep = attention_mask.bool()
        return [seen["h"][i, keep[i]].clone() for i in range(len(input_ids))]

    @contextmanager
    def _decoder_layers(self, modules: list[nn.Module]):
        """Run the decoder over ``modules`` instead of its layers, for the ``with`` block."""
        layers = self.decoder.layers
        self.decoder.layers = nn.ModuleList(modules)
        try:
            yield
        finally:
            self.decoder.layers = layers

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (with the model's logit soft-capping, if it has one)."""
        logits = self.llm.get_output_embeddings()(hidden)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, input_ids: torch.Tensor, *, attention_mask=None, position_ids=None,
                media: dict[str, MediaInput] | None = None) -> torch.Tensor:
        """Full logits (b, t, vocab). Training uses :meth:`loss`, which never builds them."""
        h, _ = self.hidden_states(input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, media=media)
        return self.logits(h)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, *, attention_mask=None,
             media: dict[str, MediaInput] | None = None, chunk: int = 4096, reduction: str = "mean"):
        """Mean next-token cross-entropy over positions whose label is not -100
        (``reduction="sum"``: the sum and the number of labelled positions).

        Only labelled positions go through the LM head, in chunks, so a large vocabulary
        never materialises (b, t, vocab) logits. The last column predicts nothing, so with
        cross-attention media only it is not run at all.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.shape[1] > 1 and all(self.modalities[n].kind == "xattn" for n in (media or {})):
            input_ids, attention_mask = input_ids[:, :-1], attention_mask[:, :-1]
        # where the labelled positions are, before the forward pass is queued: found after
        # it (``h[mask]``), an accelerator would sit idle while the host catches up
        p = self.start_column(attention_mask, media)
        target = labels[:, p + 1:]
        rows, cols = (target != -100).nonzero(as_tuple=True)  # row-major, as h[mask] takes them
        h, _, p, _ = self.run(input_ids, attention_mask, media=media, start=p)
        hs, ts = h[rows, cols], target[rows, cols]  # (s, d), (s,)
        n = ts.numel()
        head = self.llm.get_output_embeddings()
        if n == 0:
            total = h.sum() * 0.0
        elif (type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
                and not getattr(self.llm.config, "final_logit_softcapping", None)):
            # frozen head: loss and hidden-state gradient in one pass, no logits kept
            from mm.fused_ce import linear_cross_entropy
            total = linear_cross_entropy(hs, head.weight, ts, chunk)
        else:
            total = h.sum() * 0.0
            for i in range(0, n, chunk):
                total = total + F.cross_entropy(self.logits(hs[i:i + chunk]).float(), ts[i:i + chunk],
                                                reduction="sum")
        if reduction == "sum":
            return total, n
        return total / max(1, n)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 media: dict[str, MediaInput] | None = None, max_new_tokens: int = 32,
                 eos_token_id: int | list[int] | None = None, use_cache: bool = True,
                 fast: bool | None = None, compiled: bool = False) -> torch.Tensor:
        """Greedy decoding of a left-padded batch. Media are encoded and their cross-attention
        keys/values projected once, at prefill; every step reuses them. Returns (b, new) ids,
        with positions after a row's end-of-sequence filled with the end token.

        ``fast``: decode with :mod:`mm.fast_decode` (static cache; one CUDA graph per step on
        a GPU); ``None`` (default): on CUDA when the LLM supports it. Same tokens up to
        floating-point rounding. ``compiled``: on a CPU, the fast path's decoding step
        compiled by torch.compile, once per batch and cache shape (~25-40 s on 2 cores the
        first time; then ~40% less time per call at the bench's CPU shapes; :mod:`mm.fast_decode`)."""
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        b = input_ids.shape[0]
        if use_cache and fast is not False and (fast or input_ids.is_cuda):
            from mm.fast_decode import fast_generate
            ids = fast_generate(self, input_ids, attention_mask, media=media, max_new_tokens=max_new_tokens, eos=eos,
                                compiled=compiled)
            if ids is not None:  # None: this LLM has no fast path
                return ids
        if not use_cache:  # reference path: recompute everything at every step
            out = []
            ids, att = input_ids, attention_mask
            for _ in range(max_new_tokens):
                h, _, _, _ = self.run(ids, att, media=media, share_prefix=False)
                nxt = self.logits(h[:, -1]).argmax(-1)
                out.append(nxt)
                ids = torch.cat([ids, nxt[:, None]], 1)
                att = torch.cat([att, att.new_ones(b, 1)], 1)
                if eos and all(any(int(x) in eos for x in row) for row in torch.stack(out, 1)):
                    break
            return self._finish(torch.stack(out, 1), eos)
        h, cache, _, encoded = self.run(input_ids, attention_mask, media=media, use_cache=True)
        cross = encoded[0]
        pos = attention_mask.long().sum(-1, keepdim=True) - 1  # (b, 1) last position
        att = attention_mask
        nxt = self.logits(h[:, -1]).argmax(-1)
        out = [nxt]
        done = torch.tensor([int(x) in eos for x in nxt], device=nxt.device)
        for _ in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            att = torch.cat([att, att.new_ones(b, 1)], 1)
            pos = pos + 1
            h, cache = self.hidden_states(nxt[:, None], attention_mask=att, position_ids=pos, cache=cache,
                                          use_cache=True, encoded=(cross, {}))
            nxt = self.logits(h[:, -1]).argmax(-1)
            out.append(nxt)
            done = done | torch.tensor([int(x) in eos for x in nxt], device=nxt.device)
        return self._finish(torch.stack(out, 1), eos)

    @staticmethod
    def _finish(ids: torch.Tensor, eos: set) -> torch.Tensor:
        if not eos:
            return ids
        fill = next(iter(eos))
        ids = ids.clone()
        for row in ids:
            hit = [i for i, x in enumerate(row.tolist()) if x in eos]
            if hit:
                row[hit[0]:] = fill
        return ids
