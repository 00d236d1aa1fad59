"""The extension API for a modality.

Notation: b=batch, m=media tokens, e=feature width, d=LLM width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mm.modality import Modality


@dataclass(frozen=True)
class LLMShape:
    """What an adapter builder needs to know of the frozen LLM."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float = 1e-5
    # text -> token ids with the LLM's tokenizer (None where no tokenizer is at hand)
    token_ids: Callable[[str], list[int]] | None = field(default=None, compare=False, repr=False)
    # token id -> a copy of its input embedding (d,) (None where the weights are not at hand)
    token_embedding: Callable[[int], torch.Tensor] | None = field(default=None, compare=False, repr=False)


def llm_shape(config, tokenizer=None, embeddings=None) -> LLMShape:
    """``embeddings``: the LLM's input embedding table (V, d), for builders that initialise
    new embeddings from existing rows."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config

    def token_ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_embedding(i: int):
        return embeddings[i].detach().float().cpu().clone()
    return LLMShape(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                    n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                    norm_eps=getattr(c, "rms_norm_eps", 1e-5),
                    token_ids=token_ids if tokenizer is not None else None,
                    token_embedding=token_embedding if embeddings is not None else None)


def xattn_layers(n_layers: int, *, every: int = 4, first: int | None = None,
                 layers: list[int] | None = None) -> list[int]:
    """Decoder layer indices that get a cross-attention block before them: explicit
    ``layers``, or one before every ``every``-th layer (0-based ``every-1, 2*every-1, ...``),
    optionally only from ``first`` on."""
    if layers is not None:
        return sorted(layers)
    out = [i for i in range(every - 1, n_layers, every)]
    if first is not None:
        out = [i for i in out if i >= first]
    if not out:
        raise ValueError(f"no cross-attention layer: every={every}, first={first}, n_layers={n_layers}")
    return out


def stack_items(items: list[dict]) -> dict:
    """Batch per-item dicts of equal-shaped tensors."""
    return {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k]) else [it[k] for it in items]
            for k in items[0]}


@dataclass
class ModalityType:
    """Everything the library needs to know about one modality.

    Attributes:
        name: default name (also the manifest key holding the input's path, e.g. ``image``).
        kind: ``"xattn"`` (cross-attention) or ``"tokens"`` (token embeddings).
        build: ``build(llm: LLMShape, **options) -> Modality``; options come from the YAML.
        read: ``read(path: Path) -> raw``; raises ValueError with one line naming the file.
        preprocess: ``preprocess(raw, modality: Modality, **options) -> item`` (tensors).
        collate: ``collate(items) -> encoder inputs`` for a batch of items.
        empty: ``empty(item) -> item`` an all-padding item shaped like ``item``.
        num_tokens: for ``"tokens"``: ``num_tokens(item, modality) -> int`` placeholders.
        suffixes: file suffixes by which the CLI recognises this modality's inputs.
        prompt: default instruction when the user gives no text.
        sources: built-in data source types, name -> ``f(**options) -> list[record]``.
        record_prompt: ``f(record) -> user text or None``: the prompt for a manifest record
            without a ``question`` (e.g. from its ``task`` field).
        init_options: ``build`` options that only set parameters' starting values; a stage
            started with ``init_from`` loads the earlier run's values instead, so a difference
            between the two runs' settings is reported (``mm.runs.init_option_mismatches``).
    """

    name: str
    kind: str
    build: Callable[..., Modality]
    read: Callable[[Path], Any]
    preprocess: Callable[..., Any]
    collate: Callable[[list], Any] = stack_items
    empty: Callable[[Any], Any] | None = None
    num_tokens: Callable[[Any, Modality], int] | None = None
    suffixes: tuple[str, ...] = ()
    prompt: str = "Describe this."
    sources: dict[str, Callable[..., list[dict]]] = field(default_factory=dict)
    record_prompt: Callable[[dict], str | None] | None = None
    init_options: tuple[str, ...] = ()

    def make_empty(self, item):
        if self.empty is not None:
            return self.empty(item)
        if isinstance(item, dict):
            return {k: torch.zeros_like(v) if torch.is_tensor(v) else v for k, v in item.items()}
        return torch.zeros_like(item)


def cross_attention_modality(llm: LLMShape, encoder: torch.nn.Module, *, media_dim: int, every: int = 4,
                             first: int | None = None, layers: list[int] | None = None, heads: int | None = None,
                             kv_heads: int | None = None, ffn_mult: float = 2.0,
                             placement: str = "after_question") -> Modality:
    """A cross-attention modality: ``encoder`` -> gated cross-attention blocks shaped like the
    LLM's attention, before every ``every``-th decoder layer (or the explicit ``layers``);
    ``placement``: where an unmarked prompt puts the media (:class:`mm.modality.Modality`)."""
    from adapters.cross_attention import GatedCrossAttention

    h = heads or llm.n_heads
    k = kv_heads or llm.n_kv_heads
    blocks = {i: GatedCrossAttention(dim=llm.dim, media_dim=media_dim, n_heads=h, n_kv_heads=k,
                                     head_dim=llm.dim // h, ffn_dim=int(ffn_mult * llm.dim), norm_eps=llm.norm_eps)
              for i in xattn_layers(llm.n_layers, every=every, first=first, layers=layers)}
    return Modality(kind="xattn", encoder=encoder, xattn=blocks, placement=placement)


def token_modality(llm: LLMShape, encoder: torch.nn.Module, *, enc_dim: int, dim: int = 256, heads: int = 4,
                   ffn_dim: int = 512, kernel_size: int = 3, stride: int = 2) -> Modality:
    """A token-embedding modality: ``encoder`` -> Conv1d (``stride``) -> one rotary
    Transformer layer -> Linear to the LLM width (the Llama 3 speech adapter's shape)."""
    from adapters.speech import speech_adapter

    adapter = speech_adapter(encoder_dim=enc_dim, dim=dim, llm_dim=llm.dim, num_heads=heads, ffn_dim=ffn_dim,
                             kernel_size=kernel_size, stride=stride)
    return Modality(kind="tokens", encoder=encoder, adapter=adapter, llm_dim=llm.dim)


def token_count(n: int, *, kernel_size: int = 3, stride: int = 2) -> int:
    """Adapter output length for ``n`` encoder frames (Conv1d with padding ``kernel_size//2``)."""
    return (n + 2 * (kernel_size // 2) - kernel_size) // stride + 1
