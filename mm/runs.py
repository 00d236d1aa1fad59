"""Building a model from a config, and saving / loading runs.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/`` (only
what trains, plus optimizer and data position, for resuming) and ``model/`` (every weight
outside the LLM, safetensors, plus ``model.json``): enough to rebuild the model in a fresh
process from the run directory alone (and the dotted paths of user modalities).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from mm.checkpoint import CheckpointError, load_tensors, save_tensors, atomic_write_text
from mm.config import ConfigError, ModelConfig, RunConfig, load_config
from mm.llm import FrozenLLM, load_frozen_llm, text_fingerprint
from mm.modalities import ModalityType, get_type, llm_shape
from mm.model import MultimodalLM

log = logging.getLogger("mm")

_LLM_CACHE: dict = {}


def get_llm(cfg: ModelConfig) -> FrozenLLM:
    """Load the frozen LLM (memoised per process: stages of a demo share it)."""
    key = (cfg.llm, cfg.dtype, cfg.trust_remote_code)
    if key not in _LLM_CACHE:
        _LLM_CACHE[key] = load_frozen_llm(cfg.llm, dtype=getattr(torch, cfg.dtype),
                                          trust_remote_code=cfg.trust_remote_code)
    return _LLM_CACHE[key]


def modality_types(cfg: ModelConfig) -> dict[str, ModalityType]:
    return {name: get_type(spec.get("type", name)) for name, spec in cfg.modalities.items()}


def build_model(cfg: ModelConfig) -> tuple[MultimodalLM, FrozenLLM, dict[str, ModalityType]]:
    """Frozen LLM + the configured modalities (fresh weights)."""
    llm = get_llm(cfg)
    types = modality_types(cfg)
    shape = llm_shape(llm.model.config, llm.tokenizer, llm.model.get_input_embeddings().weight)
    mods = {}
    for name, spec in cfg.modalities.items():
        opts = {k: v for k, v in spec.items() if k != "type"}
        try:
            mods[name] = types[name].build(shape, **opts)
        except TypeError as e:
            raise ConfigError(f"model.modalities.{name}: {e}") from None
        if mods[name].kind != types[name].kind:
            raise ConfigError(f"modality {name}: built a {mods[name].kind!r} module, type says {types[name].kind!r}")
    return MultimodalLM(llm.model, mods), llm, types


def modality_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.modalities.state_dict().items()}


def save_model(model: MultimodalLM, llm: FrozenLLM, cfg: RunConfig, out: Path, state: dict | None = None) -> None:
    """Everything outside the LLM, on its own (never mixed into the LLM's weights)."""
    out = Path(out)
    save_tensors(out / "model" / "modalities.safetensors", state if state is not None else modality_state(model),
                 {"stage": cfg.stage, "llm_fingerprint": llm.fingerprint})
    atomic_write_text(out / "model" / "model.json", json.dumps({
        "llm": cfg.model.llm, "llm_fingerprint": llm.fingerprint, "stage": cfg.stage,
        "modalities": {n: {"type": s.get("type", n), "kind": model.modalities[n].kind,
                           "placement": model.modalities[n].placement}
                       for n, s in cfg.model.modalities.items()}}, indent=2))


def placement_mismatches(model: MultimodalLM, run_dir: Path, copy: dict[str, str]) -> list[str]:
    """One line for each ``init_copy`` that starts one modality's cross-attention blocks from
    another's blocks trained with the media at another placement: they learnt to read the
    media from where that placement put them, so they are a poor start (the demo's video
    captions: 0.914 with the image blocks' placement, 0.633 with the other). Runs saved before
    model.json recorded placements give nothing."""
    try:
        saved = json.loads((Path(run_dir) / "model" / "model.json").read_text())["modalities"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    pairs = {(dst.split(".", 1)[0], src.split(".", 1)[0]) for dst, src in (copy or {}).items()
             if dst.split(".")[1:2] == ["xattn"] and src.split(".")[1:2] == ["xattn"]}
    lines = []
    for d, s in sorted(pairs):
        theirs = (saved.get(s) or {}).get("placement")
        ours = model.modalities[d].placement if d in model.modalities else None
        if theirs and ours and theirs != ours:
            lines.append(f"init_copy: {d}.xattn starts from {s}.xattn of {run_dir}, trained with the {s} "
                         f"media placed {theirs}, but {d} is placed {ours} (set {d}'s adapter placement "
                         f"to {theirs})")
    return lines


def _option(options: dict, dotted: str):
    """options["a"]["b"] for "a.b"; None where a level is missing or not a dict."""
    for key in dotted.split("."):
        options = options.get(key) if isinstance(options, dict) else None
    return options


def init_option_mismatches(cfg: RunConfig, types: dict[str, ModalityType], run_dir: Path) -> list[str]:
    """One line for each modality option that only sets starting values (its type's
    ``init_options``, e.g. speech's ``boundary_init``; a dotted name such as
    ``encoder.branch_init`` is an option inside one of the modality's dicts) and differs
    between this stage and the ``init_from`` run: the run's tensors are loaded over this
    stage's initialisation, so the option here has no effect (set it in the run that first
    builds the modality)."""
    try:
        theirs = load_config(Path(run_dir) / "config.yaml").model.modalities
    except (OSError, ConfigError, ValueError):
        return []
    lines = []
    for name, t in sorted(types.items()):
        if name not in theirs:
            continue
        ours = cfg.model.modalities.get(name) or {}
        for opt in t.init_options:
            a, b = _option(ours, opt), _option(theirs.get(name) or {}, opt)
            if a != b:
                lines.append(f"init_from: {name}.{opt} is {a!r} here but {b!r} in {run_dir}; that run's "
                             f"values are loaded, so this setting has no effect (set it in the first run)")
    return lines


def _copied(tensors: dict, dst: str, src: str, own: dict) -> dict:
    """The tensors under prefix ``src``, renamed to prefix ``dst``. A ``*`` in both stands for
    a layer index: ``video.xattn.*.q_proj: image.xattn.*.q_proj`` copies each image block's
    q_proj to the video block at the same layer, for the layers this model has (so a config
    need not name an LLM's layers)."""
    if "*" not in src and "*" not in dst:
        return {dst + k[len(src):]: v for k, v in tensors.items() if k.startswith(src + ".")}
    if src.count("*") != 1 or dst.count("*") != 1:
        raise CheckpointError(f"init_copy {dst!r}: {src!r}: '*' (a layer index) must appear once in each")
    pattern = re.compile(re.escape(src).replace(r"\*", r"(\d+)") + r"(\..+)")
    out = {}
    for k, v in tensors.items():
        m = pattern.fullmatch(k)
        name = m and dst.replace("*", m.group(1)) + m.group(2)
        if name in own:
            out[name] = v
    return out


def load_weights(model: MultimodalLM, run_dir: Path, *, strict: bool = True,
                 copy: dict[str, str] | None = None) -> list[str]:
    """Load ``run_dir/model/modalities.safetensors`` into the model. Returns missing keys
    (modalities the earlier run did not have) when not strict. ``copy``: destination prefix
    -> source prefix, to initialise new modules from saved ones."""
    path = Path(run_dir) / "model" / "modalities.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path}: no saved model in {run_dir} (did that run finish?)")
    tensors, _ = load_tensors(path)
    own = model.modalities.state_dict()
    for dst, src in (copy or {}).items():
        found = _copied(tensors, dst, src, own)
        if not found:
            raise CheckpointError(f"{path}: init_copy source {src!r} has no tensors"
                                  + (f" for a {dst!r} of this model" if "*" in src else ""))
        tensors.update(found)
    unknown = [k for k in tensors if k not in own]
    shape = [k for k in tensors if k in own and own[k].shape != tensors[k].shape]
    if shape:
        raise CheckpointError(f"{path}: {len(shape)} tensors have other shapes than this model's, e.g. "
                              f"{shape[0]} {tuple(tensors[shape[0]].shape)} vs {tuple(own[shape[0]].shape)}")
    missing = [k for k in own if k not in tensors]
    if strict and (missing or unknown):
        raise CheckpointError(f"{path}: does not match the model (missing {missing[:3]}, unexpected {unknown[:3]})")
    model.modalities.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    return missing


def load_run(run_dir: str | Path, *, llm: str | None = None,
             trust_remote_code: bool = False) -> tuple[MultimodalLM, FrozenLLM, dict, RunConfig]:
    """Rebuild a trained model from its run directory (in a fresh process). A run directory
    from elsewhere cannot turn on remote code: only the caller's ``trust_remote_code`` counts."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    cfg.model.trust_remote_code = trust_remote_code
    if llm:
        cfg.model.llm = llm
    model, frozen, types = build_model(cfg.model)
    load_weights(model, run_dir)
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    if meta.get("llm_fingerprint") and meta["llm_fingerprint"] != frozen.fingerprint:
        log.warning("%s: the LLM differs from the one this run was trained on", run_dir)
    model.eval()
    return model, frozen, types, cfg


def check_fingerprint(model: MultimodalLM, llm: FrozenLLM) -> None:
    now = text_fingerprint(model.llm)
    if now != llm.fingerprint:
        raise RuntimeError(f"the frozen LLM's weights changed (fingerprint {llm.fingerprint[:12]} -> {now[:12]})")
