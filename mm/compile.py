"""Regional ``torch.compile`` for training: each repeated block compiled on its own.

The repeated blocks are the LLM's decoder layers, the cross-attention adapters and the
encoders' block stacks (every ``nn.ModuleList`` inside an encoder). Blocks of one kind share
their code, so a handful of graphs cover the model and a new block costs no compile; the
glue between them (embedding, media encoding, the loss) stays eager. Compiling the whole
model instead would trace the data-dependent prefix handling of :meth:`MultimodalLM.run` and
recompile for every prefix length. Calls that carry a KV cache run eager: the demo's stages,
whose prompts share a prefix kept as keys/values, gain nothing from this (measured: the image
adapter stage at the same speed within noise, after ~130 s of compiling).

Measured at the bench's 1B shapes on one H200: 1.32x the peer with a frozen encoder (0.172 s a
step against 0.201 s eager; its frozen blocks left eager, see ``encoders``) and 1.25x with a
trained one (0.312-0.322 s against 0.350 s). On the bench's CPU shapes (Intel Xeon, 2 cores):
~10% faster than eager in one alternated comparison, no faster in the bench's own compile
pass; the first steps pay the compile (~30-90 s on a CPU with an empty TorchInductor cache,
~17 s on the GPU). Opt-in.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")  # transformers' names over 4.x-5.x


def repeated_blocks(model, *, encoders: bool | None = True) -> list[nn.Module]:
    """The modules :func:`compiled_blocks` compiles, in a fixed order: the LLM's layers, the
    adapters, and the encoders' blocks (``encoders=False``: none of them; ``None``: those with
    a parameter that requires grad, i.e. that train in this stage)."""
    mods = list(model.layers)
    for mod in model.modalities.values():
        if mod.kind == "xattn":
            mods += list(mod.xattn.values())
        enc = getattr(mod, "encoder", None)
        if enc is None or encoders is False:
            continue
        seen: set[int] = set()
        for _, sub in enc.named_modules():
            if isinstance(sub, nn.ModuleList) and id(sub) not in seen:
                for inner in sub.modules():  # a list inside a block is part of that block
                    seen.add(id(inner))
                mods += [b for b in sub if encoders or any(p.requires_grad for p in b.parameters())]
    unique = {id(m): m for m in mods}  # modalities may share an encoder
    return list(unique.values())


@contextlib.contextmanager
def compiled_blocks(model, *, dynamic: bool | None = None, backend: str = "inductor",
                    encoders: bool | None = None):
    """Run ``model``'s repeated blocks through ``torch.compile`` inside the ``with`` block;
    the modules are left as found on exit.

    Args:
        model: a :class:`mm.model.MultimodalLM`.
        dynamic: ``torch.compile``'s: ``None`` (default) compiles the first shape statically
            and later ones with symbolic sizes (training batches vary in length); ``False``
            for fixed shapes (a benchmark).
        backend: ``torch.compile``'s backend (tests use ``"aot_eager"``: no C++ compiler).
        encoders: which encoder blocks: ``None`` (default) those that train in this stage
            (a frozen encoder block stays eager), ``True`` all, ``False`` none. On one H200
            at the bench's 1B shapes, frozen encoder: 0.244 s a step with its blocks compiled,
            0.172 s with them eager, 0.200 s all eager; trainable encoder: 0.312-0.322 s
            with them compiled, 0.324 s eager, 0.350 s all eager. An eager frozen open_clip
            block takes PyTorch's fused attention inference path.
    """
    from mm.model import MEDIA_KWARG

    media_kw = getattr(model, "_media_kw", MEDIA_KWARG)

    def wrap(fn):
        compiled = torch.compile(fn, dynamic=dynamic, backend=backend)

        def forward(*args, **kwargs):
            # the decoder passes the media to every layer as a keyword the adapters' hooks
            # have already used; left in, dynamo would guard on them and recompile each step
            kwargs.pop(media_kw, None)
            if any(kwargs.get(k) is not None for k in CACHE_KWARGS):
                # a KV cache (a shared text prefix, decoding) is indexed by the layer's number:
                # one graph per layer, past dynamo's recompile limit; those calls run eager
                return fn(*args, **kwargs)
            return compiled(*args, **kwargs)
        return forward

    mods = repeated_blocks(model, encoders=encoders)
    for m in mods:
        m.forward = wrap(m.forward)
    log.info("torch.compile (%s) on %d blocks; the first steps compile", backend, len(mods))
    try:
        yield mods
    finally:
        for m in mods:
            del m.forward
