"""Atomic checkpoint files: write to a temporary file in the same folder, fsync, rename.

A crash or kill mid-write leaves the previous file intact. Weights are only ever written and
read as safetensors; the optimizer and random state go through ``torch.save`` and are read
back with ``weights_only=True`` (no unpickling of arbitrary objects).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or tampered with; one line naming the file."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic(path, w)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    import hashlib
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous().reshape(-1)
        h.update(k.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Safetensors with our metadata and a SHA-256 of the tensors (checked on load)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"mm": json.dumps(metadata or {}), "sha256": _digest(tensors)}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        tensors = load_file(path)
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            raw = f.metadata() or {}
        meta = json.loads(raw.get("mm", "{}"))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({str(e).splitlines()[0]})") from None
    if "sha256" in raw and raw["sha256"] != _digest(tensors):
        raise CheckpointError(f"{path}: checksum mismatch, the file was modified or damaged")
    return tensors, meta


def _state_digest(state) -> str:
    """SHA-256 over a nested state (dicts, lists, tensors, numbers): bit for bit."""
    import hashlib
    h = hashlib.sha256()

    def walk(x):
        if torch.is_tensor(x):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"D%d" % len(x))
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"L%d" % len(x))
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())
    walk(state)
    return h.hexdigest()


def save_state(path: Path, state: dict) -> None:
    """``torch.save`` of plain data and tensors, with a SHA-256 of it (checked on load)."""
    state = {**state, "_sha256": _state_digest(state)}
    _atomic(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt archives
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if why.startswith("Weights only load failed"):  # never advise turning the safe loader off
            why = "holds objects the safe loader refuses"
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({why})") from None
    digest = state.pop("_sha256", None) if isinstance(state, dict) else None
    if digest is None:
        raise CheckpointError(f"{path}: no checksum in this checkpoint file; it cannot be verified")
    if digest != _state_digest(state):
        raise CheckpointError(f"{path}: checksum mismatch, the file was modified or damaged")
    return state
