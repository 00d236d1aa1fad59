"""Short end-to-end stage runs on a tiny LLM: training, resume, checkpoints, frozen weights."""

import json
from pathlib import Path

import pytest
import torch

from mm.checkpoint import CheckpointError, load_tensors
from mm.config import ConfigError, load_config
from mm.runs import load_run
from mm.train import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _cfg(tmp_path, tiny_llm_dir, manifest, out="run", steps=6, extra=()):
    return load_config(CONFIGS / "demo" / "image_adapter_pretrain.yaml", [
        f"out={tmp_path / out}", f"model.llm={tiny_llm_dir}", "init_from=null",
        f"data.sources=[{{type: manifest, path: {manifest}}}]", f"optim.steps={steps}",
        "optim.batch_size=4", "optim.warmup_steps=2", "checkpoint_every=2", "log_every=1",
        "model.modalities.image.adapter={every: 2}", *extra])


def test_stage_runs_and_reloads(tmp_path, tiny_llm_dir, image_manifest):
    out = train(_cfg(tmp_path, tiny_llm_dir, image_manifest), progress=False)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 7))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["text_weights_unchanged"] and summary["bad_samples"] == 0
    cfg = load_config(out / "config.yaml")  # the resolved config is in the run dir
    assert cfg.optim.steps == 6
    model, llm, types, _ = load_run(out)
    gates = [p for n, p in model.modalities.named_parameters() if n.endswith("attn_gate")]
    assert any(float(g.detach().abs()) > 0 for g in gates)  # it trained
    assert not any(p.requires_grad for p in model.llm.parameters())
    # model.json records each modality's placement; a copy of cross-attention blocks trained
    # at another placement is named in one line (the training log's warning)
    from mm.runs import placement_mismatches

    saved = json.loads((out / "model" / "model.json").read_text())["modalities"]
    assert saved["image"]["placement"] == model.modalities["image"].placement == "after_question"
    copy = {"image.xattn.*.q_proj": "other.xattn.*.q_proj", "image.xattn.*.mlp": "other.xattn.*.mlp",
            "image.encoder": "other.encoder"}
    assert placement_mismatches(model, out, copy) == []  # out has no "other"
    fake = tmp_path / "other_run"
    (fake / "model").mkdir(parents=True)
    for placed, expect in (("before_answer", 1), ("after_question", 0)):
        (fake / "model" / "model.json").write_text(json.dumps({"modalities": {"other": {"placement": placed}}}))
        lines = placement_mismatches(model, fake, copy)
        assert len(lines) == expect
        assert all("other media placed before_answer, but image is placed after_question" in l for l in lines)


def test_resume_is_exact(tmp_path, tiny_llm_dir, image_manifest):
    straight = train(_cfg(tmp_path, tiny_llm_dir, image_manifest, out="a"), progress=False)
    cfg = _cfg(tmp_path, tiny_llm_dir, image_manifest, out="b")
    train(cfg, progress=False, stop_after=3)
    assert not (tmp_path / "b" / "model").exists()
    resumed = train(cfg, progress=False)
    a, _ = load_tensors(straight / "model" / "modalities.safetensors")
    b, _ = load_tensors(resumed / "model" / "modalities.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_crash_during_checkpoint_keeps_previous(tmp_path, tiny_llm_dir, image_manifest, monkeypatch):
    cfg = _cfg(tmp_path, tiny_llm_dir, image_manifest, out="c")
    train(cfg, progress=False, stop_after=2)
    import mm.train as mt
    real = mt.save_tensors

    def boom(path, tensors, meta=None):
        Path(path).write_bytes(b"partial")  # a half-written temporary file
        raise OSError("disk full")
    monkeypatch.setattr(mt, "save_tensors", boom)
    with pytest.raises(OSError):
        train(cfg, progress=False)
    monkeypatch.setattr(mt, "save_tensors", real)
    out = train(cfg, progress=False)  # resumes from the intact step-2 checkpoint
    assert (out / "model" / "modalities.safetensors").exists()


def test_tampered_checkpoint_is_refused(tmp_path, tiny_llm_dir, image_manifest):
    out = train(_cfg(tmp_path, tiny_llm_dir, image_manifest, out="d", steps=2), progress=False)
    f = out / "model" / "modalities.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="modalities.safetensors"):
        load_run(out)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_run(out)


def test_changed_text_weights_are_an_error(tmp_path, tiny_llm_dir, image_manifest, monkeypatch):
    import mm.train as mt
    real = mt.save_checkpoint

    def tamper(out, step, model, *a, **k):
        with torch.no_grad():
            next(model.llm.parameters()).view(-1)[0] += 1.0
        return real(out, step, model, *a, **k)
    monkeypatch.setattr(mt, "save_checkpoint", tamper)
    with pytest.raises(RuntimeError, match="frozen LLM's weights changed"):
        train(_cfg(tmp_path, tiny_llm_dir, image_manifest, out="e", steps=2), progress=False)
    from mm.runs import _LLM_CACHE
    _LLM_CACHE.clear()  # that LLM object was modified on purpose


def test_bad_samples_are_skipped_and_counted(tmp_path, tiny_llm_dir, image_manifest):
    lines = image_manifest.read_text().splitlines()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    lines += ['{"image": "broken.png", "text": "x"}', "not json", '{"image": "img0.png", "text": ""}']
    m = tmp_path / "mixed.jsonl"
    m.write_text("\n".join(lines) + "\n")
    out = train(_cfg(tmp_path, tiny_llm_dir, m, out="f", steps=4, extra=["data.max_bad_fraction=0.9"]), progress=False)
    s = json.loads((out / "summary.json").read_text())
    assert s["bad_samples"] > 0
    assert any("broken.png" in e for e in s["bad_examples"])
    from mm.data import DataError
    with pytest.raises(DataError, match="samples were bad"):
        train(_cfg(tmp_path, tiny_llm_dir, m, out="g", steps=20, extra=["data.max_bad_fraction=0.01"]), progress=False)


def test_contrastive_stage_runs(tmp_path, tiny_llm_dir, image_manifest):
    cfg = load_config(CONFIGS / "demo" / "image_encoder_pretrain.yaml", [
        f"out={tmp_path / 'clip'}", f"model.llm={tiny_llm_dir}",
        f"data.sources=[{{type: manifest, path: {image_manifest}}}]", "optim.steps=3", "optim.batch_size=4",
        "model.modalities.image.adapter={every: 2}"])
    out = train(cfg, progress=False)
    assert (out / "model" / "modalities.safetensors").exists()
    cfg.extra["text_widht"] = 64  # misspelt: an error naming it, not a silent default
    with pytest.raises(ConfigError, match=r"image_encoder_pretrain\.yaml: extra: unknown option 'text_widht' for "
                                          r"the contrastive objective"):
        train(cfg, progress=False)


def test_activation_checkpointing_gives_the_same_losses(tmp_path, tiny_llm_dir, image_manifest):
    """Non-reentrant checkpointing of LLM layers, adapters and encoder blocks: same numbers."""
    from mm.runs import _LLM_CACHE

    plain = train(_cfg(tmp_path, tiny_llm_dir, image_manifest, out="p", steps=3), progress=False)
    try:
        ck = train(_cfg(tmp_path, tiny_llm_dir, image_manifest, out="k", steps=3,
                        extra=["distributed.checkpointing=[llm, xattn, encoder]"]), progress=False)
    finally:
        _LLM_CACHE.clear()  # checkpointing flags were set on that cached LLM object, pass or fail
    la = [json.loads(l)["loss"] for l in (plain / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (ck / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)


def test_compiled_blocks_give_the_same_losses(tmp_path, tiny_llm_dir, image_manifest):
    """``compile: true`` (aot_eager here: no C++ compiler needed) trains to the same losses,
    the text weights unchanged, and leaves the cached LLM's layers uncompiled."""
    from mm.runs import _LLM_CACHE

    plain = train(_cfg(tmp_path, tiny_llm_dir, image_manifest, out="p", steps=3), progress=False)
    comp = train(_cfg(tmp_path, tiny_llm_dir, image_manifest, out="c", steps=3,
                      extra=["compile=true", "compile_backend=aot_eager"]), progress=False)
    la = [json.loads(l)["loss"] for l in (plain / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (comp / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)
    assert json.loads((comp / "summary.json").read_text())["text_weights_unchanged"]
    assert _LLM_CACHE
    for llm in _LLM_CACHE.values():
        assert not any("forward" in m.__dict__ for m in llm.model.modules())


def test_learning_rate_schedules():
    from mm.config import RunConfig
    from mm.train import _lr_lambda

    cfg = RunConfig(stage="x")
    cfg.optim.warmup_steps, cfg.optim.steps = 10, 110
    f = _lr_lambda(cfg)
    assert f(0) == 0.1 and f(9) == 1.0 and f(10) == 1.0 and abs(f(60) - 0.5) < 1e-12 and f(110) == 0.0
    cfg.optim.min_lr_ratio = 0.1
    assert abs(f(110) - 0.1) < 1e-12 and abs(f(60) - 0.55) < 1e-12 and f(10) == 1.0
    cfg.optim.schedule = "constant"
    assert f(5) == 0.6 and f(60) == 1.0 and f(500) == 1.0


def test_optimizer_is_fused_and_steps_like_the_default():
    """The training loop's AdamW takes the fused kernel on CPU and moves the parameters as the
    default implementation does (both parameter groups: weight decay, and the gates' own rate)."""
    from mm.train import adamw

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]

    def groups(ps):
        return [{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-2, "weight_decay": 0.0}]

    fused = adamw(groups(ours), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    plain = adamw(groups(ref), fused=False, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)  # optim.fused: false
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(5):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q)
    assert all(not torch.allclose(p, s) for p, s in zip(ours, start))  # they moved


def _losses(run: Path) -> list[float]:
    """The loss at each step (a resumed run's log: the last entry for a step)."""
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        by_step[m["step"]] = m["loss"]
    return [by_step[k] for k in sorted(by_step)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stage_trains_on_cuda_as_on_the_cpu(tmp_path, tiny_llm_dir, image_manifest):
    """The same stage on the GPU and on the CPU (float32): the GPU path (the fused loss's
    Triton kernel, fused AdamW on CUDA, checkpoints written from GPU tensors, resume) follows
    the CPU's losses, keeps the text weights bit for bit, and its run loads back."""
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding's convolution, in fp32 on both
    cpu = train(_cfg(tmp_path, tiny_llm_dir, image_manifest, out="cpu", extra=["device=cpu"]), progress=False)
    cfg = _cfg(tmp_path, tiny_llm_dir, image_manifest, out="gpu", extra=["device=cuda"])
    train(cfg, progress=False, stop_after=3)
    gpu = train(cfg, progress=False)  # resumed from step 2's checkpoint
    assert json.loads((gpu / "summary.json").read_text())["text_weights_unchanged"]
    lc, lg = _losses(cpu), _losses(gpu)
    assert len(lc) == len(lg) == 6
    torch.testing.assert_close(torch.tensor(lg), torch.tensor(lc), rtol=1e-3, atol=1e-4)
    model, *_ = load_run(gpu)
    ref, *_ = load_run(cpu)
    for (n, a), (_, b) in zip(model.modalities.named_parameters(), ref.modalities.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=n)
