"""torchrun + FSDP2 on CPU (gloo): two processes give the single-process loss and weights,
and checkpoints move between world sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.checkpoint import load_tensors

CFG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "image_adapter_pretrain.yaml"


def _train(out, nproc, steps, tiny_llm_dir, manifest):
    args = [str(CFG), f"out={out}", f"model.llm={tiny_llm_dir}", "init_from=null", f"optim.steps={steps}",
            "optim.batch_size=4", "optim.warmup_steps=0", "optim.schedule=constant", "checkpoint_every=1",
            "log_every=1", f"data.sources=[{{type: manifest, path: {manifest}}}]",
            "model.modalities.image.adapter={every: 2}", "distributed.mixed_precision=none", "threads=1",
            "--no-progress"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "mm.cli", "train", *args]
    else:
        # --standalone: a rendezvous on a free local port (a fixed one can be taken or linger)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "mm.cli", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(l)["loss"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    t, _ = load_tensors(Path(out) / "model" / "modalities.safetensors")
    return t


def test_two_processes_match_one(tmp_path, tiny_llm_dir, image_manifest):
    one = _train(tmp_path / "one", 1, 3, tiny_llm_dir, image_manifest)
    two = _train(tmp_path / "two", 2, 3, tiny_llm_dir, image_manifest)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (one, two)
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)

    # save on 2 processes and resume on 1, and the reverse: both continue identically
    a = _train(tmp_path / "two", 1, 5, tiny_llm_dir, image_manifest)   # saved on 2, resumed on 1
    b = _train(tmp_path / "one", 2, 5, tiny_llm_dir, image_manifest)   # saved on 1, resumed on 2
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-4 * max(1.0, abs(x)), (a, b)
    wa, wb = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)


def test_device_cuda_without_an_index_is_this_process_gpu(monkeypatch):
    """``device: cuda`` picks this process's GPU (torch.cuda.set_device refuses "cuda"
    without an index, as `mm train` on a GPU found)."""
    from mm import distributed

    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(d))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.setup("cuda").device == torch.device("cuda", 0)
    assert distributed.setup("cuda:1").device == torch.device("cuda", 1)
    assert seen == [torch.device("cuda", 0), torch.device("cuda", 1)]
