"""What trains, declared in one place.

Trainable parts are named by prefixes relative to ``model.modalities``: ``image`` (all of the
image modality), ``image.encoder``, ``image.xattn``, ``speech.adapter``, ... The LLM is never
trainable: a prefix that would reach it is an error.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("mm")


def set_trainable(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Freeze everything, then unfreeze parameters under ``prefixes``. Returns the trainable
    parameter names (relative to ``model.modalities``), sorted."""
    names = []
    for p in model.parameters():
        p.requires_grad_(False)
    known = set()
    for name, p in model.modalities.named_parameters():
        parts = name.split(".")
        known.update(".".join(parts[:i]) for i in range(1, min(4, len(parts)) + 1))
        if any(name == pre or name.startswith(pre + ".") for pre in prefixes):
            p.requires_grad_(True)
            names.append(name)
    for pre in prefixes:
        if pre not in known:
            raise ValueError(f"trainable: {pre!r} names no module of the model "
                             f"(modalities: {', '.join(sorted(model.modalities))})")
    return sorted(names)


def describe(model: nn.Module) -> list[str]:
    """One line per top-level module: trained or frozen, with parameter counts."""
    lines = []
    groups = {"llm": model.llm}
    for name, mod in model.modalities.items():
        for sub, child in mod.named_children():
            groups[f"{name}.{sub}"] = child
        if hasattr(mod, "boundary"):
            groups[f"{name}.boundary"] = None
    for g, m in groups.items():
        params = list(m.parameters()) if m is not None else [model.modalities[g.split(".")[0]].boundary]
        n = sum(p.numel() for p in params)
        t = sum(p.numel() for p in params if p.requires_grad)
        state = "trained" if t == n and n else "frozen" if t == 0 else "partly trained"
        lines.append(f"{g:<24} {state:<15} {n / 1e6:9.3f}M params")
    return lines
