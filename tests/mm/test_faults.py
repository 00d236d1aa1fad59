"""Faults: training killed at random moments, a full disk while checkpointing, damaged
checkpoints. A run that resumes after any of them ends with the same weights as one that
never stopped, or stops with one line naming the damaged file."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mm.checkpoint import load_state, load_tensors
from mm.cli import main
from mm.config import load_config
from mm.train import train

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo" / "image_adapter_pretrain.yaml"


def _overrides(out, tiny_llm_dir, manifest, steps):
    return [f"out={out}", f"model.llm={tiny_llm_dir}", "init_from=null", f"optim.steps={steps}",
            f"data.sources=[{{type: manifest, path: {manifest}}}]", "optim.batch_size=2", "optim.warmup_steps=2",
            "checkpoint_every=1", "log_every=1", "threads=1", "model.modalities.image.adapter={every: 2}"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # `threads=1` in these runs must not slow the rest of the suite
    yield
    torch.set_num_threads(n)


def _same_weights(a: Path, b: Path) -> None:
    ta, _ = load_tensors(a / "model" / "modalities.safetensors")
    tb, _ = load_tensors(b / "model" / "modalities.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_random_kills_then_resume_match_an_uninterrupted_run(tmp_path, tiny_llm_dir, image_manifest):
    steps = 12
    ref = train(load_config(CONFIG, _overrides(tmp_path / "ref", tiny_llm_dir, image_manifest, steps)), progress=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mm.cli", "train", str(CONFIG), *_overrides(out, tiny_llm_dir, image_manifest, steps),
           "--no-progress"]
    rng = random.Random(7)
    log = tmp_path / "stderr.txt"
    kills = []
    latest = out / "checkpoints" / "latest"
    for _ in range(3):
        before = latest.read_text() if latest.exists() else None
        with open(log, "a") as err:
            p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 180
        while p.poll() is None and (latest.read_text() if latest.exists() else None) == before \
                and time.time() < deadline:
            time.sleep(0.01)  # wait until it saved a new checkpoint, then kill it a random moment later
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills.append(round(delay, 3))
        p.wait()
    assert len(kills) == 3 and not (out / "model").exists(), (kills, log.read_text()[-2000:])
    # the uninterrupted finish runs here (one process start less): it resumes what the killed ones saved
    train(load_config(CONFIG, _overrides(out, tiny_llm_dir, image_manifest, steps)), progress=False)
    assert json.loads((out / "summary.json").read_text())["steps"] == steps
    _same_weights(ref, out)


def _disk_full(*args, **kwargs):
    path = args[1] if len(args) > 1 else kwargs.get("filename") or kwargs.get("f")
    Path(path).write_bytes(b"\0" * 64)  # a partly written file, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("target", ["mm.checkpoint.save_file", "torch.save"])
def test_full_disk_while_checkpointing_keeps_the_previous_one(tmp_path, tiny_llm_dir, image_manifest, monkeypatch,
                                                              capsys, target):
    ovr = _overrides(tmp_path / "run", tiny_llm_dir, image_manifest, steps=3)
    train(load_config(CONFIG, ovr), progress=False, stop_after=1)
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step-00000001"
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(__import__(module, fromlist=[name]), name, _disk_full)
    assert main(["train", str(CONFIG), *ovr, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mm: error:") and "No space left on device" in err and "\n" not in err, err
    monkeypatch.undo()
    assert (root / "latest").read_text() == "step-00000001"
    assert not list(root.rglob("*.tmp"))  # no half-written file left behind
    load_tensors(root / "step-00000001" / "trainable.safetensors")
    assert load_state(root / "step-00000001" / "state.pt")["step"] == 1
    out = train(load_config(CONFIG, ovr), progress=False)  # resumes from the intact step 1
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def _tamper_state(path: Path) -> None:
    st = torch.load(path, weights_only=True)
    exp_avg = next(v for s in st["optimizer"]["state"].values() for k, v in s.items() if k == "exp_avg")
    exp_avg.view(-1)[0] += 1.0  # a valid file with one changed number
    torch.save(st, path)


def _tamper_tensors(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    next(iter(tensors.values())).view(-1)[0] += 1.0
    save_file(tensors, path, metadata=meta)  # keeps the old checksum


DAMAGE = {
    "trainable truncated": ("trainable.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                            "truncated or corrupt"),
    "trainable tampered": ("trainable.safetensors", _tamper_tensors, "checksum mismatch"),
    "trainable missing": ("trainable.safetensors", Path.unlink, "no such checkpoint file"),
    "state truncated": ("state.pt", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                        "truncated or corrupt"),
    "state tampered": ("state.pt", _tamper_state, "checksum mismatch"),
    "state garbage": ("state.pt", lambda p: p.write_bytes(b"not a checkpoint" * 10), "truncated or corrupt"),
    "state empty": ("state.pt", lambda p: p.write_bytes(b""), "truncated or corrupt"),
}


def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, tiny_llm_dir, image_manifest, capsys):
    ovr = _overrides(tmp_path / "run", tiny_llm_dir, image_manifest, steps=3)
    train(load_config(CONFIG, ovr), progress=False, stop_after=1)
    ck = tmp_path / "run" / "checkpoints" / "step-00000001"
    keep = tmp_path / "intact"
    shutil.copytree(ck, keep)
    for case, (name, damage, problem) in DAMAGE.items():
        damage(ck / name)
        assert main(["train", str(CONFIG), *ovr, "--no-progress"]) == 2, case
        err = capsys.readouterr().err.strip()
        assert err.startswith("mm: error:") and str(ck / name) in err and problem in err and "\n" not in err, (case, err)
        assert not (tmp_path / "run" / "model").exists()  # never trained on from a damaged state
        shutil.rmtree(ck)
        shutil.copytree(keep, ck)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-00000009")  # points at nothing
    assert main(["train", str(CONFIG), *ovr, "--no-progress"]) == 2
    assert "step-00000009" in capsys.readouterr().err
