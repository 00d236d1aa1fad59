"""Every YAML under configs/ loads against the schema and instantiates its model."""

from pathlib import Path

import pytest
import torch

from mm.config import ConfigError, load_config
from mm.modalities import get_type, llm_shape

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))
# parts other configs include (not runnable on their own)
INCLUDED = {f for p in CONFIGS for line in p.read_text().splitlines()
            if line.startswith("include:") for f in [line.split(":", 1)[1].split("#")[0].strip()]}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_instantiates(path, smollm2_dir):
    first = path.read_text().splitlines()[0]
    if path.name not in INCLUDED:
        assert first.startswith("# mm ") or first.startswith("# torchrun"), \
            f"{path} must start with the command that runs it"
    else:
        assert first.startswith("# included by"), f"{path} must say which configs include it"
    cfg = load_config(path)
    import transformers
    llm_cfg = transformers.AutoConfig.from_pretrained(smollm2_dir) if cfg.model.llm == "smollm2" else \
        transformers.AutoConfig.for_model(**cfg.extra["llm_config"]) if "llm_config" in cfg.extra else None
    if llm_cfg is None:
        pytest.skip(f"{path.name}: LLM {cfg.model.llm} is a user path")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir) if cfg.model.llm == "smollm2" else None
    # with the tokenizer (a speech read-out names its blank as text) and a stand-in embedding
    # table (speech boundaries may start as copies of a token's embedding)
    table = torch.zeros(llm_cfg.vocab_size, llm_cfg.hidden_size) if tok is not None else None
    shape = llm_shape(llm_cfg, tok, table)
    with torch.device("meta"):  # shapes only: the Llama 3 presets are large
        for name, spec in cfg.model.modalities.items():
            t = get_type(spec.get("type", name))
            mod = t.build(shape, **{k: v for k, v in spec.items() if k != "type"})
            assert mod.kind == t.kind


def test_unknown_keys_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: x\noptim: {lr: 0.1, bogus: 1}\n")
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_config(p)
    p.write_text("stage: x\n")
    cfg = load_config(p, ["optim.lr=0.5", "model.modalities.image.adapter.every=2"])
    assert cfg.optim.lr == 0.5 and cfg.model.modalities["image"]["adapter"]["every"] == 2
    p.write_text("stage: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "missing.yaml")


def test_include_merges_files_in_order(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.1, steps: 7}\nmodel: {modalities: {image: {adapter: {every: 2}}}}\n")
    (tmp_path / "more.yaml").write_text("optim: {steps: 9}\n")
    (tmp_path / "run.yaml").write_text(
        "include: [base.yaml, more.yaml]\noptim: {lr: 0.5}\nmodel: {modalities: {image: {encoder: {preset: tiny}}}}\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.batch_size=3"])
    assert (cfg.optim.lr, cfg.optim.steps, cfg.optim.batch_size) == (0.5, 9, 3)  # the file's own keys win
    assert cfg.model.modalities["image"] == {"adapter": {"every": 2}, "encoder": {"preset": "tiny"}}
    (tmp_path / "loop.yaml").write_text("include: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("include: loop.yaml\n")
    with pytest.raises(ConfigError, match="loop2.yaml: include loop.yaml includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="bad.yaml: include nowhere.yaml: no such file"):
        load_config(tmp_path / "bad.yaml")


def test_a_regular_install_carries_every_config(tmp_path, monkeypatch):
    """configs/ is outside the packages: pyproject's data-files copy each of its YAMLs to
    <prefix>/share/mm-frozen/configs, where configs_dir() looks when there is no checkout."""
    import glob
    import sys
    import tomllib

    import mm.demo as demo

    root = Path(__file__).resolve().parents[2]
    files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = {str(Path(dest) / Path(f).name) for dest, pats in files.items()
               for p in pats for f in glob.glob(str(root / p))}
    wanted = {str(demo.INSTALLED_CONFIGS / p.relative_to(root / "configs")) for p in CONFIGS}
    assert shipped == wanted
    assert demo.configs_dir() == demo.CONFIGS  # a checkout uses its own folder
    monkeypatch.setattr(demo, "CONFIGS", tmp_path / "no_checkout")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="configs folder not found"):
        demo.configs_dir()
    (tmp_path / demo.INSTALLED_CONFIGS / "demo").mkdir(parents=True)
    assert demo.configs_dir() == tmp_path / demo.INSTALLED_CONFIGS
