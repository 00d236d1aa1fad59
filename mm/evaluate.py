"""Evaluation on held-out records: exact match per task (captions, VQA, ...)."""

from __future__ import annotations

import time
from collections import defaultdict

from mm.data import load_source
from mm.infer import answer_records, exact_match


def evaluate(model, types: dict, tokenizer, sources: list[dict], *, batch_size: int = 32,
             preprocess: dict | None = None, max_new_tokens: int = 16, samples: int = 5) -> dict:
    """Generate for every record of ``sources``; report exact match per ``task``.

    Returns ``{task: {"exact_match": x, "n": n, "bad": k, "samples": [...]}, "seconds": s}``.
    """
    t0 = time.time()
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
    out["seconds"] = round(time.time() - t0, 1)
    return out
