"""Evaluation on held-out records: exact match per task (captions, VQA, ...)."""

from __future__ import annotations

import time
from collections import defaultdict

from mm.data import load_source
from mm.infer import answer_records, exact_match


def evaluate(model, types: dict, tokenizer, sources: list[dict], *, batch_size: int = 32,
             preprocess: dict | None = None, max_new_tokens: int = 16, samples: int = 5,
             prefix_cache: int = 0) -> dict:
    """Generate for every record of ``sources``; report exact match per ``task``.

    ``prefix_cache``: reuse up to that many text-only prompt prefixes' keys/values across
    batches (:class:`mm.model.PrefixCache`, shared with training in this process; same
    answers up to float rounding).

    Returns ``{task: {"exact_match": x, "n": n, "bad": k, "samples": [...]}, "seconds": s}``.
    """
    from mm.model import PrefixCache, shared_text_cache

    t0 = time.time()
    before = model.prefix_cache
    if prefix_cache:
        model.prefix_cache = shared_text_cache(model.llm, PrefixCache, prefix_cache)
    try:
        out = _evaluate(model, types, tokenizer, sources, batch_size, preprocess, max_new_tokens, samples)
    finally:
        model.prefix_cache = before
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _evaluate(model, types, tokenizer, sources, batch_size, preprocess, max_new_tokens, samples) -> dict:
    out: dict = {}
    for src in sources:
        recs = load_source(src, types)
        preds = answer_records(model, types, tokenizer, recs, batch_size=batch_size, preprocess=preprocess,
                               max_new_tokens=max_new_tokens, on_error="skip")
        by_task = defaultdict(list)
        for rec, pred in zip(recs, preds):
            by_task[rec.get("task", src.get("task", "default"))].append((rec, pred))
        for task, pairs in by_task.items():
            ok = [exact_match(p, r["text"]) for r, p in pairs if p is not None]
            out[task] = {"exact_match": sum(ok) / max(1, len(ok)), "n": len(ok),
                         "bad": sum(p is None for _, p in pairs),
                         "samples": [{"question": r.get("question"), "reference": r["text"], "prediction": p,
                                      **{k: r[k] for k in r if k in types}} for r, p in pairs[:samples]]}
    return out
