"""A modality as the model sees it: an encoder and the adapter that brings it into the LLM.

Two ways in:
- ``"xattn"``: gated cross-attention layers before chosen decoder layers (image, video);
- ``"tokens"``: a projection whose outputs are used as token embeddings, between two
  trainable boundary embeddings (speech).

Notation: b=batch, m=media tokens, e=encoder width, d=LLM width.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

KINDS = ("xattn", "tokens")
PLACEMENTS = ("after_question", "before_answer", "before_question")
READOUT_BLANKS = ("keep", "drop", "prompted")


class Modality(nn.Module):
    """Encoder + adapter for one modality.

    Args:
        kind: ``"xattn"`` or ``"tokens"``.
        encoder: module with ``forward(inputs) -> (features (b, m, e), mask (b, m))``.
        xattn: for ``"xattn"``, decoder layer index -> cross-attention block.
        adapter: for ``"tokens"``, module ``(features, mask) -> (embeddings (b, m2, d), mask)``.
        llm_dim: LLM embedding width (for the boundary embeddings of ``"tokens"``).
        readout_blank: for ``"tokens"``, the vocabulary read-out (see :meth:`embed`): the
            token id that stands for "nothing here" (a CTC blank); None = no read-out.
        readout_blanks: with a read-out, which items the LLM sees with their blank frames:
            ``"keep"`` (every item: tokens, then the blanks), ``"drop"`` (none: the tokens
            only) or ``"prompted"`` (items whose user turn also has text, e.g. ASR's "Repeat
            after me in English:", keep them; speech that is the whole user turn, a spoken
            question, is read as its tokens only). The blanks help a small frozen LLM repeat
            what it is given and make it answer less like the text question would.
        placement: where a prompt with no media marker puts this modality's items:
            ``"after_question"`` (default: at the end of the user's text) or, for ``"xattn"``,
            ``"before_question"`` (in front of it, so every question token sees the media, as
            in Llama 3's prompts) or ``"before_answer"`` (at the prompt's last token, after the
            chat template's assistant header). Training and inference read
            it from the model, so they always agree; a marker written in the question wins.
    """

    def __init__(self, *, kind: str, encoder: nn.Module, xattn: dict[int, nn.Module] | None = None,
                 adapter: nn.Module | None = None, llm_dim: int | None = None, readout_blank: int | None = None,
                 readout_blanks: str = "keep", placement: str = "after_question"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown modality kind {kind!r}; choose one of {KINDS}")
        if placement not in PLACEMENTS or (kind == "tokens" and placement != "after_question"):
            raise ValueError(f"placement must be one of {PLACEMENTS} (token-embedding media: after_question), "
                             f"not {placement!r}")
        self.kind = kind
        self.placement = placement
        self.encoder = encoder
        if kind == "xattn":
            if not xattn:
                raise ValueError("a cross-attention modality needs at least one adapter layer")
            self.xattn = nn.ModuleDict({str(i): m for i, m in sorted(xattn.items())})
        else:
            if adapter is None or llm_dim is None:
                raise ValueError("a token-embedding modality needs an adapter and llm_dim")
            self.adapter = adapter
            # begin / end of media: new embeddings, so no vocabulary row of the LLM changes.
            self.boundary = nn.Parameter(torch.randn(2, llm_dim) * 0.02)
        if readout_blanks not in READOUT_BLANKS:
            raise ValueError(f"readout blanks must be one of {READOUT_BLANKS}, not {readout_blanks!r}")
        self.readout_blank = readout_blank
        self.readout_blanks = readout_blanks
        # frozen front-part features kept across steps (training sets it; not a submodule)
        self.feature_cache: FeatureCache | None = None

    @property
    def layer_indices(self) -> list[int]:
        return [int(i) for i in self.xattn] if self.kind == "xattn" else []

    def encode(self, inputs, keys: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features ``(features (n, m, e), mask (n, m))`` of a batch of ``n`` items.

        With a :class:`FeatureCache` attached (``feature_cache``), per-item ``keys`` (see
        :func:`mm.data.media_key`), dict inputs and an encoder whose front part is fixed in
        this stage (``encoder.cache_cut()`` is not None; ``encoder.trunk(**inputs, cut=)`` and
        ``encoder.head(trunk, **inputs, cut=)`` split its forward there), that part's output is
        looked up per item and only the items not seen before run it; the rest of the encoder
        runs as usual.
        """
        if not isinstance(inputs, dict):
            return self.encoder(inputs)
        kw, cache = inputs, self.feature_cache
        cut = self.encoder.cache_cut() if cache is not None and keys is not None and hasattr(
            self.encoder, "cache_cut") else None
        if cut is None:
            return self.encoder(**inputs)
        ids = [(cut, k) for k in keys]
        found = {i: cache.get(i) for i in dict.fromkeys(ids)}  # each distinct item looked up once
        miss = [i for i, f in found.items() if f is None]
        if miss:
            first = {i: j for j, i in reversed(list(enumerate(ids)))}  # a batch row of each item
            rows = torch.tensor([first[i] for i in miss],
                                device=next(v for v in kw.values() if torch.is_tensor(v)).device)
            sub = {k: v.index_select(0, rows) if torch.is_tensor(v) else v for k, v in kw.items()}
            with torch.no_grad():
                fresh = self.encoder.trunk(**sub, cut=cut)  # (len(miss), ...)
            for r, i in enumerate(miss):
                found[i] = fresh[r].clone()  # its own storage, so eviction frees it
                cache.put(i, found[i])
        return self.encoder.head(torch.stack([found[i] for i in ids]), **kw, cut=cut)

    def embed(self, feats: torch.Tensor, mask: torch.Tensor, vocab: torch.Tensor | None = None,
              prompted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token embeddings ``[begin, adapter(features)..., end]`` left-aligned, with mask.

        With a read-out (``readout_blank``) and the LLM's input embedding table ``vocab``
        (V, d), the adapter's frames are read as the LLM's own tokens first: see
        :func:`vocabulary_readout`; :attr:`readout_blanks` says which items keep their blank
        frames (``prompted`` (b,) bool: whether each item's user turn has text besides it;
        None = yes).

        Returns (embeddings (b, m2 + 2, d), mask (b, m2 + 2), width (b,)): ``width`` is the
        placeholder columns each item was given (its adapter frames + 2); an item whose
        blank frames were left out fills fewer, and :meth:`mm.model.MultimodalLM.run` masks
        the rest out of attention.
        """
        emb, emask = self.adapter(feats, mask)  # (b, m2, d), (b, m2)
        width = emask.sum(-1) + 2
        if self.readout_blank is not None:
            if vocab is None:
                raise ValueError("this modality reads its frames out as LLM tokens: embed() needs the LLM's "
                                 "input embedding table (vocab=)")
            emb, read = vocabulary_readout(emb, emask, vocab, self.readout_blank)
            if self.readout_blanks == "drop":  # the tokens read, not the blank frames behind them
                emask = emask & read
            elif self.readout_blanks == "prompted" and prompted is not None:
                emask = emask & (read | prompted.to(read.device)[:, None])
        b, m2, d = emb.shape
        out = emb.new_zeros(b, m2 + 2, d)
        lengths = emask.sum(-1)
        out[:, 0] = self.boundary[0]
        out[:, 1:m2 + 1] = emb * emask[..., None]
        out[torch.arange(b), lengths + 1] = self.boundary[1].to(out.dtype)
        omask = torch.arange(m2 + 2, device=emb.device)[None] < (lengths + 2)[:, None]
        return out, omask, width


class FeatureCache:
    """Outputs of an encoder's fixed front part, per media item, kept across training steps.

    In a stage where an encoder's front part does not train (e.g. the ViT of an adapter
    stage, or the whole image tower with the encoder frozen), its output for an item depends
    on the item alone, so an item seen before need not run it again: PERFORMANCE.md counts a
    cached encoder as 0 FLOPs. Entries are ``(cut, item key) -> tensor`` on the device they
    were computed on, evicted least-recently-used beyond ``max_bytes``.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key):
        t = self.entries.get(key)
        if t is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if n > self.max_bytes or key in self.entries:
            return
        self.entries[key] = t
        self.bytes += n
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def stats(self) -> dict:
        return {"items": len(self.entries), "mib": round(self.bytes / 2 ** 20, 1), "hits": self.hits,
                "misses": self.misses}


def nearest_tokens(frames: torch.Tensor, vocab: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """Index of the nearest row of ``vocab`` (V, d) (Euclidean) for each of ``frames`` (..., d),
    in chunks of ``chunk`` frames so that no (frames, V) matrix larger than that is held."""
    flat = frames.detach().reshape(-1, frames.shape[-1]).to(vocab.dtype)
    sq = vocab.detach().pow(2).sum(-1)  # (V,)
    out = [(sq[None] - 2 * flat[i:i + chunk] @ vocab.detach().T).argmin(-1) for i in range(0, flat.shape[0], chunk)]
    return (torch.cat(out) if out else flat.new_zeros(0, dtype=torch.long)).reshape(frames.shape[:-1])


def ctc_repeats_blank(idx: torch.Tensor, blank: int) -> torch.Tensor:
    """``idx`` (b, m) with every frame that repeats the frame before it set to ``blank``: CTC's
    collapse, after which the non-blank entries are the tokens read, in order."""
    repeat = torch.zeros_like(idx, dtype=torch.bool)
    repeat[:, 1:] = idx[:, 1:] == idx[:, :-1]
    return idx.masked_fill(repeat, blank)


def vocabulary_readout(emb: torch.Tensor, mask: torch.Tensor, vocab: torch.Tensor,
                       blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read adapter frames ``emb`` (b, m, d) as the LLM's own tokens (CTC-style read-out).

    Each valid frame becomes the input embedding of its nearest token (forward), with a
    straight-through gradient to the frame (backward: the identity). As in CTC decoding, a
    frame read as the same token as the frame before it repeats that token and counts as a
    blank ("the the" -> "the"; a token said twice has a blank between). The frames read as
    ``blank`` move behind the others, keeping their order: the LLM then sees the transcript's
    tokens in a row, followed by blanks, instead of tokens scattered between blanks (a CTC
    alignment's shape), which a small frozen LLM copies far less reliably. Used with a CTC
    loss that pulls frames onto token embeddings (``speech_lm``); on a CPU budget of minutes
    the frames stay too far from the embeddings for the frozen LLM to read them as they are.
    Padded frames (``mask`` False) stay zero and last.

    Returns (embeddings (b, m, d), read (b, m) bool: the columns holding a token read, the
    first ones of each row).
    """
    idx = ctc_repeats_blank(nearest_tokens(emb, vocab), blank)  # (b, m)
    snapped = vocab[idx].to(emb.dtype)
    out = snapped + (emb - emb.detach()) if emb.requires_grad else snapped  # forward: exactly the rows
    rank = (idx == blank).long() + 2 * (~mask).long()  # tokens, then blanks, then padding
    order = torch.sort(rank, dim=1, stable=True).indices  # (b, m)
    out = torch.gather(out, 1, order[..., None].expand_as(out))
    read = torch.arange(idx.shape[1], device=idx.device)[None] < (rank == 0).sum(-1, keepdim=True)
    return out * mask[..., None], read
