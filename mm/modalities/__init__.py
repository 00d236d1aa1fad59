"""The modality registry: built-in types and user types named by a dotted path.

A :class:`ModalityType` is the whole extension API: it says how to build the encoder and
adapter, how to read one raw input, how to preprocess and batch it, and how it enters the
LLM. Image, video and speech are declared through it like any user modality.
"""

from __future__ import annotations

import importlib

from mm.modalities.base import (LLMShape, ModalityType, cross_attention_modality, llm_shape, stack_items,
                                token_count, token_modality)

__all__ = ["ModalityType", "LLMShape", "llm_shape", "get_type", "builtin_types", "UnknownModality",
           "cross_attention_modality", "token_modality", "token_count", "stack_items"]


class UnknownModality(KeyError):
    def __str__(self):
        return self.args[0]


def builtin_types() -> dict[str, ModalityType]:
    """Name -> type of the modalities that ship with the library."""
    from mm.modalities.image import IMAGE
    types = {"image": IMAGE}
    for mod, attr in (("mm.modalities.video", "VIDEO"), ("mm.modalities.speech", "SPEECH")):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        types[getattr(m, attr).name] = getattr(m, attr)
    return types


def get_type(spec: str) -> ModalityType:
    """A built-in name (``image``) or a dotted path ``package.module:attribute`` whose target
    is a :class:`ModalityType` or a function returning one."""
    builtins = builtin_types()
    if spec in builtins:
        return builtins[spec]
    if ":" not in spec:
        raise UnknownModality(f"unknown modality {spec!r}; built-in: {', '.join(sorted(builtins))}; "
                              "or give a dotted path 'package.module:attribute'")
    module, attr = spec.split(":", 1)
    import os
    import sys
    if os.getcwd() not in sys.path:  # user code next to the config, as with `python -m`
        sys.path.append(os.getcwd())
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownModality(f"cannot import modality {spec!r} ({e}); built-in: {', '.join(sorted(builtins))}") from None
    if callable(obj) and not isinstance(obj, ModalityType):
        obj = obj()
    if not isinstance(obj, ModalityType):
        raise UnknownModality(f"{spec!r} is not a ModalityType (got {type(obj).__name__})")
    return obj
