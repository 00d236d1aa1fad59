"""Whether part of an encoder is fixed in a stage (what a feature cache may keep)."""

from __future__ import annotations

from torch import nn


def fixed(*parts) -> bool:
    """True when none of ``parts`` (modules or parameters) trains and no dropout among them
    is active: their output is then a function of their input alone."""
    for p in parts:
        if isinstance(p, nn.Parameter):
            if p.requires_grad:
                return False
            continue
        if any(q.requires_grad for q in p.parameters()):
            return False
        for m in p.modules():
            if m.training and "dropout" in type(m).__name__.lower() and (getattr(m, "p", 0) or getattr(m, "prob", 0)):
                return False
    return True
