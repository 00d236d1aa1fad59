"""Safe loading, checked over the library's source: weights come from safetensors (or the
default LLM's GGUF file), `torch.load` only with `weights_only=True`, no pickle, no remote
code unless the user turns it on, no hub downloads; manifest paths resolve next to the
manifest."""

import ast
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("mm", "encoders", "adapters")
FILES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _calls():
    for path in FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield path, node


def _name(func) -> str:
    """``torch.load`` for ``torch.load(...)``, ``AutoModel.from_pretrained`` for a method."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _where(path, node) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def test_the_scan_sees_the_library():
    assert len(FILES) > 20 and any(p.name == "checkpoint.py" for p in FILES)
    assert any(_name(c.func) == "torch.load" for _, c in _calls())


def test_torch_load_only_with_weights_only_true():
    bad = [_where(p, c) for p, c in _calls() if _name(c.func) == "torch.load"
           and not (isinstance(_kw(c, "weights_only"), ast.Constant) and _kw(c, "weights_only").value is True)]
    assert not bad, f"torch.load without weights_only=True at {bad}"
    text = [f"{p.relative_to(REPO)}" for p in FILES
            if "weights_only=False" in p.read_text(encoding="utf-8") or "from torch import load" in p.read_text()]
    assert not text, text


def test_no_pickle_and_numpy_without_pickles():
    bad = [_where(p, c) for p, c in _calls() if _name(c.func) in (
        "pickle.load", "pickle.loads", "dill.load", "joblib.load", "cloudpickle.load", "yaml.load", "yaml.unsafe_load")]
    bad += [_where(p, c) for p, c in _calls() if _name(c.func) in ("np.load", "numpy.load")
            and not (isinstance(_kw(c, "allow_pickle"), ast.Constant) and _kw(c, "allow_pickle").value is False)]
    assert not bad, bad


def test_remote_code_is_off_unless_the_user_turns_it_on():
    bad = [_where(p, c) for p, c in _calls()
           if isinstance(_kw(c, "trust_remote_code"), ast.Constant) and _kw(c, "trust_remote_code").value is True]
    for path in FILES:  # nor as a default: def f(trust_remote_code=True)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args[len(node.args.args) - len(node.args.defaults):] + node.args.kwonlyargs
                defaults = node.args.defaults + node.args.kw_defaults
                bad += [_where(path, node) for a, d in zip(args, defaults) if a.arg == "trust_remote_code"
                        and isinstance(d, ast.Constant) and d.value is True]
    assert not bad, f"trust_remote_code=True at {bad}"
    from mm.config import ModelConfig, load_config
    assert ModelConfig().trust_remote_code is False
    assert load_config(None, ["model.trust_remote_code=true"]).model.trust_remote_code is True  # the user's switch


def test_model_weights_from_safetensors_or_gguf_only_and_no_hub():
    for path, call in _calls():
        name = _name(call.func)
        if name.endswith(".from_pretrained") and "Tokenizer" not in name:
            st = _kw(call, "use_safetensors")
            assert (isinstance(st, ast.Constant) and st.value is True) or _kw(call, "gguf_file") is not None, \
                f"{_where(path, call)}: {name} may read pickled weights (use_safetensors=True or gguf_file=)"
        assert name.split(".")[-1] not in ("hf_hub_download", "snapshot_download", "load_from_hub"), _where(path, call)
        if name.split(".")[-1] in ("create_model", "create_model_and_transforms", "create_model_from_pretrained"):
            pre = _kw(call, "pretrained")
            assert isinstance(pre, ast.Constant) and pre.value is None, f"{_where(path, call)}: open_clip download"


def test_checkpoint_state_is_read_safely(tmp_path):
    """A state file holding an arbitrary object is refused, not unpickled."""
    import torch

    from mm.checkpoint import CheckpointError, load_state

    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))
    p = tmp_path / "state.pt"
    torch.save({"step": 1, "x": Boom()}, p)
    with pytest.raises(CheckpointError, match="state.pt: truncated or corrupt checkpoint .*safe loader refuses"):
        load_state(p)


def test_manifest_paths_resolve_next_to_the_manifest(tmp_path, monkeypatch):
    from mm.data import _paths, read_manifest
    (tmp_path / "data" / "img").mkdir(parents=True)
    m = tmp_path / "data" / "train.jsonl"
    m.write_text(json.dumps({"image": ["img/a.png", "/abs/b.png"], "text": "x"}) + "\n")
    monkeypatch.chdir(tmp_path)  # somewhere else
    rec = read_manifest(m)[0]
    assert _paths(rec, "image") == [tmp_path / "data" / "img" / "a.png", Path("/abs/b.png")]
