"""Run configuration: a dataclass schema, YAML files, dotted command-line overrides.

Everything is merged once (defaults <- YAML <- overrides) and the resolved result is written
into the run directory, so a run is reproducible from its own ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A configuration cannot be used; one line naming the file or key."""


@dataclass
class ModelConfig:
    llm: str = "smollm2"                  # "smollm2", a local HF model dir, or a .gguf file
    dtype: str = "float32"
    trust_remote_code: bool = False
    # name -> {type: registry name or "pkg.module:obj", encoder: {...}, adapter: {...}}
    modalities: dict[str, dict] = field(default_factory=dict)


@dataclass
class DataConfig:
    # each source: {type: easy-vqa | manifest | folder | <modality-specific>, ...options, weight: 1.0}
    sources: list[dict] = field(default_factory=list)
    # per-modality preprocessing options for this stage, e.g. {image: {max_tiles: 1}}
    preprocess: dict[str, dict] = field(default_factory=dict)
    max_bad_fraction: float = 0.1         # stop with an error when more samples than this are bad
    cache_items: int = 0                  # keep up to this many prepared samples in memory (mm.data.SampleStream)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    steps: int = 100
    batch_size: int = 8
    grad_clip: float = 1.0
    schedule: str = field(default="cosine", metadata={"choices": ("cosine", "constant")})
    min_lr_ratio: float = 0.0             # cosine ends at lr x this (a floor for the last steps)
    # zero-initialised tanh gates move by ~lr per Adam step; short runs raise their rate
    gate_lr_mult: float = 1.0
    # PyTorch's fused AdamW kernel where it exists (mm.train.adamw); false: the default
    # implementation (the same update, rounded differently)
    fused: bool = True


@dataclass
class EvalConfig:
    sources: list[dict] = field(default_factory=list)
    limit: int = 0                        # 0: everything
    batch_size: int = 32
    prefix_cache: int = 0                 # text-only prompt prefixes reused across batches; 0 = off


@dataclass
class DistConfig:
    llm: str = "shard"                    # shard | replicate (the frozen LLM under FSDP2)
    mixed_precision: str = "bf16"         # bf16 | none
    checkpointing: list[str] = field(default_factory=list)  # any of llm, xattn, encoder
    fsdp_single_process: bool = False     # apply FSDP2 even with one process (testing)


@dataclass
class RunConfig:
    stage: str = "custom"
    objective: str = "lm"                 # lm | contrastive | best_rq
    out: str = "runs/custom"
    init_from: str | None = None          # an explicit earlier run directory, never guessed
    # copy weights of init_from into other modules: {"video.xattn": "image.xattn"} copies
    # every image.xattn.* tensor to the same-named video.xattn.* one (shapes must match)
    init_copy: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    trainable: list[str] = field(default_factory=list)   # module prefixes, e.g. image.xattn
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint_every: int = 50
    log_every: int = 5
    threads: int = 0                      # torch threads; 0 = torch's default
    trunk_cache: int = 0                  # rows of frozen lower-layer states reused (mm.model.TrunkCache); 0 = off
    prefix_cache: int = 0                 # text-only prompt prefixes whose keys/values are reused (mm.model.PrefixCache); 0 = off
    feature_cache: int = 0                # MiB of fixed encoder-part outputs reused per media item (mm.modality.FeatureCache); 0 = off
    compile: bool = False                 # torch.compile each repeated block (mm.compile); single process
    compile_backend: str = "inductor"     # torch.compile's backend for `compile`
    device: str | None = None             # cpu, cuda, cuda:1 ...; default: cuda if available
    distributed: DistConfig = field(default_factory=DistConfig)
    extra: dict[str, Any] = field(default_factory=dict)  # objective-specific options
    # where the config was read from, for the errors of checks made later (an objective's
    # ``extra`` options); a class default, not a field, so it is never saved or merged
    origin: ClassVar[str] = "config"


def _merge(dc_type, base, data: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(dc_type)}
    out = {}
    for k, v in data.items():
        if k not in known:
            raise ConfigError(f"{where}: unknown key {k!r} (known: {', '.join(sorted(known))})")
        cur = getattr(base, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {k} must be a mapping")
            out[k] = _merge(type(cur), cur, v, f"{where}.{k}")
        elif isinstance(cur, tuple) and isinstance(v, list):
            out[k] = tuple(v)
        else:
            out[k] = _typed(v, cur, f"{where}.{k}")
            choices = known[k].metadata.get("choices")
            if choices and out[k] not in choices:
                raise ConfigError(f"{where}.{k}: expected one of {', '.join(choices)}, got {out[k]!r}")
    return dataclasses.replace(base, **out)


def _typed(v, default, where: str):
    """``v`` checked against the type of its default (None: anything). YAML reads ``1e-3``
    as text; a float setting takes it as the number it spells."""
    if default is None:
        return v
    if isinstance(default, float) and isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    kinds = ((bool, (bool,), "true or false"), (int, (int,), "a whole number"), (float, (int, float), "a number"),
             (str, (str,), "text"), (list, (list, tuple), "a list"), (dict, (dict,), "a mapping"))
    for t, ok, name in kinds:
        if isinstance(default, t):
            if not isinstance(v, ok) or (t is not bool and isinstance(v, bool)):
                raise ConfigError(f"{where}: expected {name}, got {v!r}")
            return float(v) if t is float else v
    return v


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true / false. PyYAML follows YAML
    1.1, where a bare yes, no, on, off, y or n is a boolean too, so ``answers: [yes, no]``
    filtered on True / False and kept nothing."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml(text: str):
    loader = _Loader(text)  # what yaml.load(text, Loader=_Loader) does; a SafeLoader, so no objects
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _parse_value(text: str):
    return _yaml(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b.c=value`` strings (value parsed as YAML) into a nested dict."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value")
        key, value = ov.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {p} is not a mapping")
        node[parts[-1]] = _parse_value(value)
    return data


def _deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, chain: tuple = ()) -> dict:
    """A config file as a dict, with its ``include:`` files (paths relative to it, merged in
    order, the file's own keys last) resolved."""
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = _yaml(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    inc = data.pop("include", None) or []
    if isinstance(inc, str):
        inc = [inc]
    if not isinstance(inc, list) or not all(isinstance(i, str) for i in inc):
        raise ConfigError(f"{path}: include must be a file name or a list of them")
    here = path.resolve()
    base: dict = {}
    for rel in inc:
        sub = (path.parent / rel).resolve()
        if sub in chain or sub == here:
            raise ConfigError(f"{path}: include {rel} includes itself")
        if not sub.exists():
            raise ConfigError(f"{path}: include {rel}: no such file")
        base = _deep_merge(base, _read_yaml(sub, chain + (here,)))
    return _deep_merge(base, data)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- YAML file (after the files it includes) <- dotted overrides, validated
    against the schema."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        data = _read_yaml(path)
    data = apply_overrides(data, list(overrides))
    cfg = _merge(RunConfig, RunConfig(), data, where)
    cfg.origin = where
    return cfg


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)

    def fix(x):
        if isinstance(x, tuple):
            return list(x)
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x
    return fix(d)


def save_config(cfg: RunConfig, path: Path) -> None:
    from mm.checkpoint import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
