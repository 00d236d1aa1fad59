"""Inference: questions about media files, answered by greedy decoding.

Used by ``mm caption``, ``mm ask``, ``mm eval`` and the demo. Batches requests; each
request is a record like the training data, without the target text.
"""

from __future__ import annotations

import re
import string

import torch

from mm.data import BadSample, collate, make_sample
from mm.prompts import encode


def _decode(tokenizer, ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


@torch.no_grad()
def answer_records(model, types: dict, tokenizer, records: list[dict], *, max_new_tokens: int = 32,
                   batch_size: int = 16, preprocess: dict | None = None, on_error: str = "raise") -> list[str | None]:
    """Answer each record (its media and ``question``). ``on_error="skip"`` returns None for
    a record whose input is bad instead of raising :class:`BadSample`."""
    from mm.prompts import end_of_turn_id

    eos = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[str | None] = [None] * len(records)
    samples = []
    for i, rec in enumerate(records):
        try:
            samples.append((i, make_sample(rec, model=model, types=types, tokenizer=tokenizer,
                                           preprocess=preprocess or {}, train=False)))
        except BadSample:
            if on_error != "skip":
                raise
    for k in range(0, len(samples), batch_size):
        chunk = samples[k:k + batch_size]
        batch = collate([s for _, s in chunk], types=types, pad_id=pad)
        ids = model.generate(batch.input_ids, batch.attention_mask, media=batch.media,
                             max_new_tokens=max_new_tokens, eos_token_id=eos)
        for (i, _), text in zip(chunk, _decode(tokenizer, ids)):
            out[i] = text
    return out


@torch.no_grad()
def answer_text(model, tokenizer, question: str, *, max_new_tokens: int = 64) -> str:
    """No media: exactly the frozen LLM's greedy answer (one prefill, the chat template)."""
    from mm.prompts import end_of_turn_id

    enc = encode(tokenizer, question)
    ids = torch.tensor([enc.ids])
    out = model.generate(ids, torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         eos_token_id=end_of_turn_id(tokenizer))
    return _decode(tokenizer, out)[0]


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (documented in the README)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(pred: str | None, ref: str) -> bool:
    return pred is not None and normalize(pred) == normalize(ref)
