"""The benchmark's pieces: FLOP counting, fused loss, cross-attention fast paths, fast decoding."""

import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from mm.flops import EncoderCount, LLMCount, train_step_flops
from tests.helpers import image_media, open_gates, tiny_image_mm, tiny_llm


def test_flops_by_hand():
    llm = LLMCount(layer_params=[10, 20, 30], attn_width=4, hidden=8, vocab=16, adapters={1: (5, 3)})
    f = train_step_flops(llm, batch=2, text_len=3, media_tokens=7)
    # layer 0 below the adapter: 2N + 4Td; layers 1, 2: 4N + 12Td; per token, 6 tokens
    assert f["llm_below_adapters"] == 6 * (2 * 10 + 4 * 3 * 4)
    assert f["llm_above_adapters"] == 6 * ((4 * 20 + 12 * 3 * 4) + (4 * 30 + 12 * 3 * 4))
    # cross-attention: 6 (q, o, MLP) + 12 N_media d per token, 6 (k, v) N_media per sample
    assert f["cross_attention"] == 6 * (6 * 5 + 12 * 7 * 4) + 2 * (6 * 3 * 7)
    assert f["lm_head"] == 6 * 4 * 8 * 16
    assert f["total"] == 3336 + 2448 + 3072
    enc = EncoderCount(layer_params=[100], global_layer_params=[50], width=2, tokens_per_tile=5, patch_params=6,
                       projector_params=9)
    t = train_step_flops(llm, batch=2, text_len=3, media_tokens=7, encoder=enc, encoder_trainable=True)
    assert t["encoder"] == 2 * ((6 * 100 + 12 * 5 * 2) * 5 + (6 * 50 + 12 * 5 * 2) * 5 + 6 * 6 * 4)
    assert t["projector"] == 2 * 6 * 9 * 5
    fr = train_step_flops(llm, batch=2, text_len=3, media_tokens=7, encoder=enc, encoder_trainable=False)
    assert fr["encoder"] == 2 * ((2 * 100 + 4 * 5 * 2) * 5 + (2 * 50 + 4 * 5 * 2) * 5 + 2 * 6 * 4)
    cached = train_step_flops(llm, batch=2, text_len=3, media_tokens=7, encoder=enc, features_cached=True)
    assert cached["encoder"] == 0


def test_flops_reproduce_the_peer_mfu_of_performance_md():
    """At 1B-xattn shapes (built on the meta device) the count gives the peer's ~33% / ~32%."""
    from mm.bench import SHAPES, build_ours
    from mm.flops import count_model, mfu

    s = SHAPES["1b-xattn"]
    model = build_ours(s, torch.device("meta"), torch.bfloat16)
    llm, enc = count_model(model)
    assert enc.tokens_per_tile == 1601 and sorted(llm.adapters) == [3, 7, 11, 15]
    kw = dict(batch=s.train_batch, text_len=s.train_len, media_tokens=s.media_tokens, encoder=enc)
    frozen = train_step_flops(llm, encoder_trainable=False, **kw)["total"]
    trainable = train_step_flops(llm, encoder_trainable=True, **kw)["total"]
    assert 0.31 < mfu(frozen, 0.237) < 0.35
    assert 0.30 < mfu(trainable, 0.403) < 0.34


def test_fused_cross_entropy_matches_plain():
    from mm.fused_ce import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, 50, (37,), generator=g)
    ref = F.cross_entropy(h @ w.t(), t, reduction="sum") / 37
    (gref,) = torch.autograd.grad(ref, h)
    out = linear_cross_entropy(h, w, t, chunk=8) / 37
    (gout,) = torch.autograd.grad(out, h)
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gout, gref, rtol=1e-5, atol=1e-6)
    # a target whose probability underflows in fp32 still gets its exact loss
    big = torch.zeros(1, 50, dtype=torch.float64)
    big[0, 0] = 200.0
    one = linear_cross_entropy(big, torch.eye(50, dtype=torch.float64), torch.tensor([3]))
    torch.testing.assert_close(one, F.cross_entropy(big, torch.tensor([3]), reduction="sum").float())
    # ... also beside rows that do not underflow, in one chunk
    mixed = torch.cat([big, torch.randn(3, 50, generator=g, dtype=torch.float64)])
    tm = torch.tensor([3, 1, 2, 3])
    torch.testing.assert_close(linear_cross_entropy(mixed, torch.eye(50, dtype=torch.float64), tm),
                               F.cross_entropy(mixed, tm, reduction="sum").float())


def test_fused_cross_entropy_keeps_no_subnormal_probabilities():
    """A confident row's softmax is mostly subnormal floats, which x86 CPUs multiply on a
    slow path: they are set to 0 (the loss and gradient barely move)."""
    from mm.fused_ce import _probs, linear_cross_entropy

    torch.set_flush_denormal(False)  # the CLI turns flushing on (mm.cli.flush_subnormals); not here
    logits = torch.zeros(2, 1000)
    logits[:, 0] = 95.0  # exp(-95) ~ 5e-42: subnormal in fp32
    logits[:, 1:10] = 20.0
    ref = torch.softmax(logits, -1)
    assert ((ref > 0) & (ref < torch.finfo(torch.float32).tiny)).any()
    p = _probs(logits)
    assert not ((p > 0) & (p < torch.finfo(torch.float32).tiny)).any()
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-30)
    h = logits.clone().requires_grad_(True)
    t = torch.tensor([0, 3])
    out = linear_cross_entropy(h, torch.eye(1000), t)
    (g,) = torch.autograd.grad(out, h)
    ref_loss = F.cross_entropy(logits, t, reduction="sum")
    (gref,) = torch.autograd.grad(F.cross_entropy(h, t, reduction="sum"), h)
    torch.testing.assert_close(out, ref_loss)
    torch.testing.assert_close(g, gref, rtol=0, atol=1e-6)


_TRITON_CE_CHECK = r"""
import torch, torch.nn.functional as F
import mm.fused_ce as fc
g = torch.Generator().manual_seed(0)
for dtype, v in ((torch.float32, 203), (torch.bfloat16, 130)):
    x = (torch.randn(6, v, generator=g) * 4).to(dtype)
    x[0, 5] = 90.0  # a confident row: the other targets' probabilities underflow, the loss stays exact
    t = torch.randint(0, v, (6,), generator=g)
    t[1] = v - 1  # the last column, in the last, partial block
    ref = F.cross_entropy(x.double(), t, reduction="none")
    refg = torch.softmax(x.double(), -1)
    refg[torch.arange(6), t] -= 1
    y = x.clone()
    nll = fc.softmax_grad_(y, t, write=False, block=64, num_warps=1)
    assert torch.equal(y, x), "write=False changed the logits"
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    nll = fc.softmax_grad_(y, t, block=64, num_warps=1)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(y.double(), refg.to(dtype).double(), rtol=0, atol=tol)
# the whole loss through the kernel (as on a GPU) against the plain loss
fc.use_triton = lambda x: True
h = torch.randn(37, 16, generator=g, requires_grad=True)
w = torch.randn(50, 16, generator=g) * 3
t = torch.randint(0, 50, (37,), generator=g)
ref = F.cross_entropy(h @ w.t(), t, reduction="sum")
(gref,) = torch.autograd.grad(ref, h)
out = fc.linear_cross_entropy(h, w, t, chunk=8)
(gout,) = torch.autograd.grad(out, h)
torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
torch.testing.assert_close(gout, gref, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_triton_cross_entropy_kernel_matches_plain_under_the_interpreter():
    """The GPU path's Triton kernel (softmax, loss and one-hot in one pass, in place), run by
    Triton's CPU interpreter: the per-row loss and the logits' gradient equal float64's."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_CE_CHECK], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_cross_entropy_equals_the_torch_path_on_cuda(monkeypatch):
    from mm.fused_ce import linear_cross_entropy, use_triton

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(300, 64, generator=g) * 2).cuda().requires_grad_(True)
    w = torch.randn(5000, 64, generator=g).cuda()
    t = torch.randint(0, 5000, (300,), generator=g).cuda()
    for dtype in (torch.float32, torch.bfloat16):
        hd, wd = h.to(dtype), w.to(dtype)
        assert use_triton(hd)
        out = linear_cross_entropy(hd, wd, t, chunk=128)
        (gout,) = torch.autograd.grad(out, h)
        monkeypatch.setenv("MM_FUSED_CE_TRITON", "0")
        ref = linear_cross_entropy(h.to(dtype), wd, t, chunk=128)
        (gref,) = torch.autograd.grad(ref, h)
        monkeypatch.delenv("MM_FUSED_CE_TRITON")
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-2)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(gout, gref, rtol=tol, atol=tol)


def test_model_loss_uses_fused_path_and_matches_plain(monkeypatch):
    import mm.fused_ce

    calls = []
    real = mm.fused_ce.linear_cross_entropy
    monkeypatch.setattr(mm.fused_ce, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_image_mm(tiny_llm())
    open_gates(model, 0.5)
    ids = torch.randint(1, 128, (2, 12))
    media = {"image": image_media(2, positions=torch.tensor([[3], [5]]))}
    params = [p for p in model.modalities.parameters()]
    for p in params:
        p.requires_grad_(True)
    labels = ids.clone()
    labels[:, :6] = -100
    loss = model.loss(ids, labels, media=media)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    h, _, p, _ = model.run(ids, torch.ones_like(ids), media=media, share_prefix=False)
    logits = model.logits(h)[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    rgrads = torch.autograd.grad(ref, params, allow_unused=True)
    assert calls
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, rgrads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _reference_xattn(blk, x, kv, mask):
    """The block as it was: repeat_interleave for GQA, always a (b, 1, t, m) mask."""
    k, v = kv
    b, t, _ = x.shape
    has = mask.any(-1)
    am = (mask | ~has[..., None])[:, None]
    row = has[..., None].to(x.dtype)
    q = blk.q_norm(blk.q_proj(blk.attn_norm(x)).view(b, t, blk.n_heads, blk.head_dim).transpose(1, 2))
    rep = blk.n_heads // blk.n_kv_heads
    a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=am)
    a = blk.o_proj(a.transpose(1, 2).reshape(b, t, -1))
    x = x + blk.attn_gate.tanh() * a * row
    return x + blk.mlp_gate.tanh() * blk.mlp(blk.mlp_norm(x)) * row


def test_cross_attention_gqa_fold_and_row_mask_match_reference():
    from adapters.cross_attention import GatedCrossAttention

    torch.manual_seed(0)
    blk = GatedCrossAttention(dim=64, media_dim=32, n_heads=8, n_kv_heads=2, ffn_dim=128)
    with torch.no_grad():
        blk.attn_gate.fill_(0.7)
        blk.mlp_gate.fill_(0.3)
    x = torch.randn(3, 10, 64)
    kv = blk.project_kv(torch.randn(3, 6, 32))
    mask = torch.rand(3, 10, 6) > 0.4
    mask[0, :4] = False  # rows with no media
    torch.testing.assert_close(blk(x, kv, mask), _reference_xattn(blk, x, kv, mask))
    start = torch.tensor([0, 3, 7])
    full = (torch.arange(10)[None, :, None] >= start[:, None, None]).expand(3, 10, 6)
    row = full[..., :1]
    torch.testing.assert_close(blk(x, kv, row), _reference_xattn(blk, x, kv, full))


def test_row_only_media_mask_detection():
    from mm.model import CrossMedia

    one = CrossMedia(kv={}, start=torch.tensor([[2, 2, 2], [0, 0, 0]]), valid=torch.ones(2, 3, dtype=torch.bool))
    pos = torch.arange(5)[None]
    assert one.row_only and one.attn_mask(pos).shape == (2, 5, 1)
    assert torch.equal(one.attn_mask(pos).expand(2, 5, 3), one.mask(pos))
    two = CrossMedia(kv={}, start=torch.tensor([[1, 1, 4]]), valid=torch.ones(1, 3, dtype=torch.bool))
    assert not two.row_only and two.attn_mask(pos).shape == (1, 5, 3)
    pad = CrossMedia(kv={}, start=torch.zeros(1, 3, dtype=torch.long), valid=torch.tensor([[True, True, False]]))
    assert not pad.row_only


def _left_padded(b=3, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (b, t), generator=g)
    att = torch.ones_like(ids)
    att[0, :3] = 0
    ids[0, :3] = 0
    return ids, att


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fast_decode_equals_reference(family):
    from mm.fast_decode import unsupported

    model = tiny_image_mm(tiny_llm(family))
    open_gates(model, 0.5)
    assert unsupported(model) is None
    ids, att = _left_padded()
    for media in (image_media(3, positions=torch.tensor([[2], [4], [4]])),  # one image: row-only masks
                  image_media(3, 2, positions=torch.tensor([[2, 5], [4, 6], [1, 8]]))):  # full masks
        ref = model.generate(ids, att, media={"image": media}, max_new_tokens=10, fast=False)
        fast = model.generate(ids, att, media={"image": media}, max_new_tokens=10, fast=True)
        assert torch.equal(ref, fast)
        # end-of-sequence: same stop and same fill
        eos = [int(ref[1, 2]), int(ref[0, 4]), int(ref[2, 1])]
        ref_e = model.generate(ids, att, media={"image": media}, max_new_tokens=10, eos_token_id=eos, fast=False)
        fast_e = model.generate(ids, att, media={"image": media}, max_new_tokens=10, eos_token_id=eos, fast=True)
        assert torch.equal(ref_e, fast_e)


@pytest.mark.parametrize("layout", ["measure", "packed", "wxt", "linear"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v projections with biases
def test_cpu_decode_product_orders_give_the_reference_tokens(family, layout, monkeypatch):
    """On a CPU every product order the decoder may pick (packed (in, out) copies, (W x^T)^T,
    nn.Linear's own; or the ones measured on this machine) gives the reference path's tokens
    at several rows and at one, and the copies follow the LLM's weights when they are
    written in place."""
    import mm.fast_decode as fd

    monkeypatch.setattr(fd, "CPU_LAYOUT", layout)
    model = tiny_image_mm(tiny_llm(family))
    open_gates(model, 0.5)
    ids, att = _left_padded()
    media = image_media(3, positions=torch.tensor([[2], [4], [4]]))
    one = image_media(1, positions=torch.tensor([[4]]))
    for rows in (3, 1):
        orders = fd.choose_orders(model, rows)
        assert set(orders["by_shape"].values()) <= set(fd.ORDERS) and orders["packed"] <= set(fd.PACKED_ROLES)
        if layout != "measure":
            assert orders["packed"] == (set(fd.PACKED_ROLES) if layout == "packed" else set())
            assert set(orders["by_shape"].values()) == {"linear" if layout == "packed" else layout}
    ref = model.generate(ids, att, media={"image": media}, max_new_tokens=10, fast=False)
    assert torch.equal(model.generate(ids, att, media={"image": media}, max_new_tokens=10, fast=True), ref)
    assert (model in fd._packs) == bool(fd.choose_orders(model, 3)["packed"])  # copies only when used
    outs = []
    for _ in range(2):
        ref1 = model.generate(ids[1:2], att[1:2], media={"image": one}, max_new_tokens=10, fast=False)
        assert torch.equal(model.generate(ids[1:2], att[1:2], media={"image": one}, max_new_tokens=10, fast=True),
                           ref1)
        outs.append(ref1)
        with torch.no_grad():  # new LLM weights, written in place
            model.llm.get_output_embeddings().weight.mul_(-1.0)
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs a C++ compiler")
def test_compiled_cpu_decode_step_gives_the_reference_tokens():
    """``compiled=True``: the CPU decoding step through torch.compile (C++), for several rows
    ((W x^T)^T products, two images: full masks, end-of-sequence) and one row (packed copies)."""
    model = tiny_image_mm(tiny_llm("llama"))
    open_gates(model, 0.5)
    ids, att = _left_padded()
    media = image_media(3, 2, positions=torch.tensor([[2, 5], [4, 6], [1, 8]]))
    one = image_media(1, positions=torch.tensor([[4]]))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fast decode")  # a failed compile fails the test
        ref = model.generate(ids, att, media={"image": media}, max_new_tokens=10, fast=False)
        assert torch.equal(model.generate(ids, att, media={"image": media}, max_new_tokens=10, fast=True,
                                          compiled=True), ref)
        eos = [int(ref[1, 2]), int(ref[0, 4]), int(ref[2, 1])]
        assert torch.equal(model.generate(ids, att, media={"image": media}, max_new_tokens=10, eos_token_id=eos,
                                          fast=True, compiled=True),
                           model.generate(ids, att, media={"image": media}, max_new_tokens=10, eos_token_id=eos,
                                          fast=False))
        assert torch.equal(model.generate(ids[1:2], att[1:2], media={"image": one}, max_new_tokens=10, fast=True,
                                          compiled=True),
                           model.generate(ids[1:2], att[1:2], media={"image": one}, max_new_tokens=10, fast=False))


def test_compiled_decode_step_falls_back_with_a_warning(monkeypatch):
    import mm.fast_decode as fd

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no compiler here\nmore lines")
        return run

    monkeypatch.setattr(fd.torch, "compile", broken_compile)
    model = tiny_image_mm(tiny_llm("llama"))
    open_gates(model, 0.5)
    ids, att = _left_padded()
    media = image_media(3, positions=torch.tensor([[2], [4], [4]]))
    ref = model.generate(ids, att, media={"image": media}, max_new_tokens=6, fast=False)
    with pytest.warns(UserWarning, match="compiling the step failed .RuntimeError: no compiler here.; decoding"):
        out = model.generate(ids, att, media={"image": media}, max_new_tokens=6, fast=True, compiled=True)
    assert torch.equal(out, ref)


def test_fast_decode_falls_back_for_other_families():
    from mm.fast_decode import fast_generate, unsupported

    model = tiny_image_mm(tiny_llm("gemma"))
    assert unsupported(model) is not None
    ids, att = _left_padded()
    assert fast_generate(model, ids, att, media={"image": image_media(3)}, max_new_tokens=4) is None
    a = model.generate(ids, att, media={"image": image_media(3)}, max_new_tokens=4, fast=True)
    assert a.shape == (3, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_decode_cuda_graph_equals_reference():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = tiny_image_mm(tiny_llm()).cuda()
    open_gates(model, 0.5)
    for seed in (0, 1):  # the second call replays the kept graph with new inputs
        ids, att = _left_padded(seed=seed)
        media = image_media(3, positions=torch.tensor([[2], [4], [4]]), seed=seed).to("cuda")
        ids, att = ids.cuda(), att.cuda()
        ref = model.generate(ids, att, media={"image": media}, max_new_tokens=12, fast=False)
        fast = model.generate(ids, att, media={"image": media}, max_new_tokens=12)  # default on CUDA: fast
        assert torch.equal(ref, fast)
    from mm.fast_decode import _decoders
    assert any(d.graph is not None for d in _decoders[model].values())


def test_bench_table_and_goals_from_results():
    from mm.bench import format_table, goals, rows

    def side(step, peak, mfu=0.4):
        return {"step_s": step, "tokens_per_s": 100 / step, "min_step_s": step, "cpu_step_s": step,
                "peak_bytes": peak, "mfu": mfu}

    res = {"shapes": {"name": "1b-xattn", "dtype": "bfloat16", "threads": None, "train_batch": 8, "train_len": 1024,
                      "media_tokens": 1601, "timed": 10, "warmup": 3, "gen_prompt": 32, "gen_new": 64, "gpu": True},
           "device": "cuda", "versions": {"torch": "x", "transformers": "y"}, "notes": [],
           "train": {"trainable": {"ours": side(0.2, 30), "peer": side(0.4, 55)},
                     "frozen": {"ours": side(0.2, 40, 0.55), "peer": side(0.24, 32),
                                "ours+compile": side(0.15, 35, 0.45), "ours+cache": side(0.17, 30, 0.6)}},
           "generate": {"1": {"ours": {"s": 0.2, "new_tokens_per_s": 320}, "peer": {"s": 1.0, "new_tokens_per_s": 64}},
                        "16": {"ours": {"s": 0.5, "new_tokens_per_s": 2048}, "peer": {"s": 1.2, "new_tokens_per_s": 853}}}}
    res["rows"], res["goals"] = rows(res), goals(res)
    got = {g["goal"]: g["met"] for g in res["goals"]}
    # each goal names the variant it was met with: the fastest for speed and its memory, the
    # highest MFU for MFU
    assert got["train, encoder trainable: >= 1.5x peer (ours)"]
    assert got["train, encoder frozen: >= 1.5x peer (ours+compile)"]
    assert not got["train peak memory, encoder frozen: <= peer (ours+compile)"]  # 35 > 32
    assert got["train MFU, encoder frozen: >= 50% (ours+cache)"]
    assert got["generate, batch 1: >= 300 new tokens/s"] and not got["generate, batch 16: >= 3.0x peer"]
    ratio = {r["metric"]: r["ratio"] for r in res["rows"]}
    assert ratio["train text tokens/s, encoder trainable"] == pytest.approx(2.0)
    assert ratio["train text tokens/s, encoder frozen, ours+cache"] == pytest.approx(0.24 / 0.17)
    assert ratio["train peak memory, encoder frozen, ours+cache"] == pytest.approx(32 / 30)
    assert ratio["generate new tokens/s, batch 16"] == pytest.approx(2.4)
    table = format_table(res)
    assert "ours+compile" in table and "NOT met" in table


@pytest.mark.slow
def test_bench_micro_runs(tmp_path, monkeypatch, capsys):
    """The whole protocol at tiny shapes through ``main``; a part that fails (here generation
    at batch 2) is reported and the exit status is 1, while the other parts are measured."""
    import argparse
    import json

    from mm.bench import main
    from mm.model import MultimodalLM

    real = MultimodalLM.generate

    def generate(self, input_ids, *a, **kw):
        if input_ids.shape[0] == 2:
            raise RuntimeError("CUDA out of memory (planted)")
        return real(self, input_ids, *a, **kw)

    monkeypatch.setattr(MultimodalLM, "generate", generate)
    monkeypatch.setenv("MM_BENCH_PROFILE", str(tmp_path / "prof"))
    rc = main(argparse.Namespace(shapes="micro", json=str(tmp_path / "b.json")))
    res = json.loads((tmp_path / "b.json").read_text())
    assert rc == 1
    assert res["errors"] == ["generation, batch 2: RuntimeError: CUDA out of memory (planted)"]
    names = [r["metric"] for r in res["rows"]]
    assert "train text tokens/s, encoder trainable" in names and "generate new tokens/s, batch 1" in names
    assert not any("batch 2" in n for n in names)
    for r in res["rows"]:
        assert r["ours"] > 0 and r["peer"] > 0 and r["ratio"] > 0
    assert res["train"]["frozen"]["flops"]["encoder"] < res["train"]["trainable"]["flops"]["encoder"]
    # the frozen encoder's features cached: filled by the first (warm-up) step, then only hits
    frozen = res["train"]["frozen"]
    assert frozen["flops_cached"]["encoder"] == 0 < frozen["flops"]["encoder"]
    n = res["shapes"]["train_batch"]  # distinct images
    assert frozen["ours+cache"]["cache"]["items"] == n and frozen["ours+cache"]["cache"]["misses"] == n
    assert frozen["ours+cache"]["peak_bytes"] > 0
    assert "train text tokens/s, encoder frozen, ours+cache" in names
    assert "train text tokens/s, encoder trainable, ours+cache" not in names
    out = capsys.readouterr().out
    assert "peer/ours" in out and "FAILED generation, batch 2: RuntimeError" in out
    for mode in ("trainable", "frozen"):
        for side in ("ours", "peer"):
            table = (tmp_path / "prof" / f"profile_train_{mode}_{side}.txt").read_text()
            assert f"{side}, vision encoder {mode}" in table and "Self CPU" in table
        assert f"{side}, batch 1" in (tmp_path / "prof" / f"profile_generate_1_{side}.txt").read_text()
