"""Every YAML under configs/ loads against the schema and instantiates its model."""

from pathlib import Path

import pytest
import torch

from mm.config import ConfigError, load_config
from mm.modalities import get_type, llm_shape

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_instantiates(path, smollm2_dir):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# mm ") or first.startswith("# torchrun"), f"{path} must start with the command that runs it"
    cfg = load_config(path)
    import transformers
    llm_cfg = transformers.AutoConfig.from_pretrained(smollm2_dir) if cfg.model.llm == "smollm2" else \
        transformers.AutoConfig.for_model(**cfg.extra["llm_config"]) if "llm_config" in cfg.extra else None
    if llm_cfg is None:
        pytest.skip(f"{path.name}: LLM {cfg.model.llm} is a user path")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir) if cfg.model.llm == "smollm2" else None
    shape = llm_shape(llm_cfg, tok)  # with the tokenizer: a speech read-out names its blank as text
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
