"""The command line as a user runs it: one-line errors, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mm.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llm_dir):
    import json as _json
    from PIL import Image
    from mm.config import load_config
    from mm.train import train
    d = tmp_path_factory.mktemp("clirun")
    rows = []
    for i, c in enumerate([(255, 0, 0), (0, 0, 255)] * 2):
        Image.new("RGB", (32, 32), c).save(d / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": "red" if c[0] else "blue"})
    (d / "m.jsonl").write_text("\n".join(_json.dumps(r) for r in rows))
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/demo/image_adapter_pretrain.yaml", [
        f"out={d / 'run'}", f"model.llm={tiny_llm_dir}", "init_from=null", "optim.steps=2", "optim.batch_size=2",
        f"data.sources=[{{type: manifest, path: {d / 'm.jsonl'}}}]", "model.modalities.image.adapter={every: 2}"])
    return train(cfg, progress=False), d


def test_caption_and_ask_json(capsys, trained_run):
    run, d = trained_run
    code, out, err = run_cli(capsys, "caption", "--model", str(run), "--json", str(d / "0.png"), str(d / "1.png"))
    assert code == 0, err
    rows = json.loads(out)
    assert [Path(r["file"]).name for r in rows] == ["0.png", "1.png"] and all(isinstance(r["caption"], str) for r in rows)
    code, out, err = run_cli(capsys, "ask", "--model", str(run), "--image", str(d / "0.png"), "what color?", "--json")
    assert code == 0, err
    assert "answer" in json.loads(out)[0]


@pytest.mark.parametrize("make,problem", [
    (lambda d: d / "missing.png", "no such file"),
    (lambda d: (d / "bad.png").write_bytes(b"garbage") and d / "bad.png", "not a readable image"),
    (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt", "unrecognised file type"),
])
def test_caption_bad_input_is_one_line(capsys, trained_run, make, problem):
    run, d = trained_run
    path = make(d)
    code, out, err = run_cli(capsys, "caption", "--model", str(run), str(path))
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0] and path.name in lines[0], err


def test_errors_for_bad_run_and_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "caption", "--model", str(tmp_path), str(tmp_path / "x.png"))
    assert code != 0 and "not a run directory" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.yaml").write_text("model: {modalities: {image: {type: nope.nothing:build}}}\n")
    code, _, err = run_cli(capsys, "train", str(tmp_path / "bad.yaml"))
    assert code != 0 and "cannot import modality" in err and "built-in" in err


def test_modalities_lists_kinds(capsys):
    code, out, _ = run_cli(capsys, "modalities")
    assert code == 0 and "image" in out and "xattn" in out


def test_console_script_subprocess(tiny_llm_dir):
    """The installed entry point, as a user types it (text only: the LLM alone)."""
    r = subprocess.run([sys.executable, "-m", "mm.cli", "ask", "--llm", str(tiny_llm_dir), "Hello?",
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "mm.cli", "ask", "--llm", "/nonexistent/model", "Hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "/nonexistent/model" in r.stderr


def test_the_cli_flushes_subnormal_floats():
    """mm.cli.main turns on flush-to-zero / denormals-are-zero before any parallel work."""
    import torch

    from mm.cli import main

    try:
        torch.set_flush_denormal(False)
        assert main(["modalities"]) == 0
        tiny = torch.tensor([1e-40]) * torch.tensor([1.0])
        assert float(tiny) == 0.0
    finally:
        torch.set_flush_denormal(False)
