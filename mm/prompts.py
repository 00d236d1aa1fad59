"""Prompts: the LLM's own chat template, with media markers where media go.

A sample is a user message whose text holds markers such as ``<|mm:image|>``. The chat
template is rendered as text, split at the markers, and each piece tokenised, so we know the
token position of every media item. Cross-attention media are seen by every token from that
position on; token-embedding media get placeholder ids there that the model overwrites.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MARK = "<|mm:{}|>"
_MARK_RE = re.compile(r"<\|mm:([A-Za-z0-9_]+)\|>")


def mark(name: str) -> str:
    return MARK.format(name)


def strip_marks(text: str) -> str:
    """``text`` without its media markers."""
    return _MARK_RE.sub("", text)


@dataclass
class Encoded:
    """One tokenised sample.

    ids: token ids; labels: same length, -100 except on the answer and end-of-turn token;
    media: list of (modality name, token position) in order of appearance.
    """

    ids: list[int]
    labels: list[int]
    media: list[tuple[str, int]] = field(default_factory=list)


def render(tokenizer, user_text: str) -> str:
    """The chat template for one user turn, ending with the assistant header."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                             add_generation_prompt=True, tokenize=False)
    return user_text + "\n"


def encode(tokenizer, user_text: str, answer: str | None = None, *,
           media_tokens: dict[str, list[int]] | None = None, before_answer: list[str] = ()) -> Encoded:
    """Tokenise a prompt (and optionally the answer it should produce).

    Args:
        user_text: text with media markers.
        answer: target text; the labels cover it and the end-of-turn token.
        media_tokens: for token-embedding modalities, name -> list of placeholder counts, one
            per marker occurrence (consumed in order).
        before_answer: cross-attention media with no marker, placed at the prompt's last token
            (the one that predicts the answer's first token), one name per item: the chat
            template's end of turn and assistant header then stay text-only, so fewer
            columns run the layers above the lowest adapter (see ``placement`` in
            :class:`mm.modality.Modality`).
    """
    text = render(tokenizer, user_text)
    ids: list[int] = []
    media: list[tuple[str, int]] = []
    pos = 0
    counts = {k: list(v) for k, v in (media_tokens or {}).items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for m in _MARK_RE.finditer(text):
        ids += tokenizer(text[pos:m.start()], add_special_tokens=False)["input_ids"]
        name = m.group(1)
        media.append((name, len(ids)))
        if name in counts:
            if not counts[name]:
                raise ValueError(f"more {name} markers than {name} inputs")
            ids += [pad] * counts[name].pop(0)
        pos = m.end()
    ids += tokenizer(text[pos:], add_special_tokens=False)["input_ids"]
    media += [(name, len(ids) - 1) for name in before_answer]
    labels = [-100] * len(ids)
    if answer is not None:
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
        ids += target
        labels += target
    return Encoded(ids=ids, labels=labels, media=media)


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn (``<|im_end|>`` for SmolLM2)."""
    eos = tokenizer.eos_token_id
    return eos[0] if isinstance(eos, (list, tuple)) else eos


def user_text(question: str, names: list[str], *, media_first: bool = False) -> str:
    """Place media markers after the question (default) or before it.

    After the question is the default: the text before the first media item then depends on
    the text alone, so the model computes it once per distinct prompt without gradients.
    """
    marks = "".join(mark(n) for n in names)
    return marks + question if media_first else question + marks
