"""The worked example of a new modality, from code that lives outside the library packages."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mm.cli import main

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "examples" / "accelerometer" / "accel_adapter.yaml"


def test_example_lives_outside_the_library():
    import examples.accelerometer.accel as accel
    assert not Path(accel.__file__).resolve().is_relative_to(ROOT / "mm")
    src = Path(accel.__file__).read_text()
    assert "mm.modalities import" in src  # only the public API


def test_read_errors_name_the_file(tmp_path):
    from examples.accelerometer.accel import read
    np.save(tmp_path / "bad.npy", np.zeros((10, 2)))
    with pytest.raises(ValueError, match=r"bad\.npy: expected \(samples, 3\)"):
        read(tmp_path / "bad.npy")
    (tmp_path / "x.csv").write_text("x,y,z\n1,2\n")
    with pytest.raises(ValueError, match=r"x\.csv"):
        read(tmp_path / "x.csv")


def test_train_ask_eval_and_reload_in_fresh_process(tmp_path, tiny_llm_dir, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = tmp_path / "data"
    run = tmp_path / "run"
    code = main(["train", str(YAML), f"out={run}", f"model.llm={tiny_llm_dir}", "optim.steps=3",
                 "optim.batch_size=4", "--no-progress",
                 f"data.sources=[{{type: accel-synthetic, out: {data}, n: 8, seed: 0}}]",
                 f"eval.sources=[{{type: accel-synthetic, out: {data}, n: 4, seed: 0, split: test, fmt: csv}}]"])
    assert code == 0, capsys.readouterr().err
    assert (run / "model" / "modalities.safetensors").exists()
    capsys.readouterr()
    assert main(["modalities", "--config", str(run / "config.yaml")]) == 0
    assert "accel" in capsys.readouterr().out
    # a fresh process: the run directory and the dotted path are enough
    from examples.accelerometer.synth import make_dataset
    make_dataset(data, n=4, seed=0, split="test", fmt="csv")
    rec = sorted((data / "test").glob("*.csv"))[0]
    r = subprocess.run([sys.executable, "-m", "mm.cli", "ask", "--model", str(run), "--input", f"accel={rec}",
                        "What is the person doing?", "--json", "--max-new-tokens", "4"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "answer" in json.loads(r.stdout)[0]
    r = subprocess.run([sys.executable, "-m", "mm.cli", "eval", "--model", str(run), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["activity"]["n"] == 4


def test_unknown_dotted_path_lists_choices(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(YAML.read_text().replace("examples.accelerometer.accel:ACCEL", "examples.nowhere:THING"))
    assert main(["train", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "cannot import modality 'examples.nowhere:THING'" in err and "image" in err


def test_encoder_is_orientation_invariant():
    import torch
    from examples.accelerometer.accel import AccelEncoder
    from examples.accelerometer.synth import _rotation, recording
    rng = np.random.default_rng(0)
    x = torch.from_numpy(recording("running", rng, seconds=3.0))[None]  # (1, s, 3)
    rot = torch.from_numpy(_rotation(rng)).float()
    enc = AccelEncoder(dim=16, hidden=8)
    lengths = torch.tensor([x.shape[1]])
    a, _ = enc(x, lengths)
    b, _ = enc(x @ rot.T, lengths)
    assert torch.allclose(a, b, atol=1e-4)
    walk, _ = enc(torch.from_numpy(recording("walking", rng, seconds=3.0))[None], lengths)
    assert not torch.allclose(a, walk, atol=1e-2)
