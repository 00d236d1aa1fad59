"""Regional torch.compile (mm.compile): which blocks, same numbers as eager, modules restored."""

import shutil

import pytest
import torch

from mm.compile import compiled_blocks, repeated_blocks
from tests.helpers import image_media, open_gates, tiny_image_mm, tiny_llm


def _model_and_batch():
    model = tiny_image_mm(tiny_llm(layers=4), every=2)
    open_gates(model, 0.5)
    for n, p in model.modalities.named_parameters():
        p.requires_grad_(".xattn." in f".{n}")
    model.train()
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    media = {"image": image_media(2, positions=torch.tensor([[0], [0]]))}
    return model, ids, media


def _loss_grads(model, ids, media):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model.loss(ids, ids, attention_mask=torch.ones_like(ids), media=media)
    return loss, torch.autograd.grad(loss, params)


def test_repeated_blocks_are_layers_adapters_and_encoder_stacks():
    model, _, _ = _model_and_batch()
    blocks = repeated_blocks(model)
    enc = model.modalities["image"].encoder
    expect = (list(model.layers) + list(model.modalities["image"].xattn.values())
              + list(enc.vit.transformer.resblocks) + list(enc.blocks))
    assert [id(m) for m in blocks] == [id(m) for m in expect]
    assert len({id(m) for m in blocks}) == len(blocks)
    llm_side = list(model.layers) + list(model.modalities["image"].xattn.values())
    assert [id(m) for m in repeated_blocks(model, encoders=False)] == [id(m) for m in llm_side]
    with compiled_blocks(model, backend="aot_eager", encoders=False) as mods:
        assert "forward" in vars(model.layers[0]) and "forward" not in vars(enc.blocks[0])
        assert len(mods) == len(llm_side)
    # the default: encoder blocks only where they train (a frozen block stays eager)
    for p in enc.parameters():
        p.requires_grad_(False)
    for p in enc.blocks[0].parameters():
        p.requires_grad_(True)
    assert [id(m) for m in repeated_blocks(model, encoders=None)] == [id(m) for m in llm_side + [enc.blocks[0]]]
    with compiled_blocks(model, backend="aot_eager") as mods:
        assert len(mods) == len(llm_side) + 1 and "forward" not in vars(enc.vit.transformer.resblocks[0])


def test_compiled_blocks_give_eager_numbers_and_restore_the_modules():
    """aot_eager traces every block through dynamo and AOTAutograd (no C++ compiler needed):
    the plumbing is what is tested here; the inductor path is the slow test below."""
    import torch._dynamo

    model, ids, media = _model_and_batch()
    ref, gref = _loss_grads(model, ids, media)
    torch._dynamo.reset()
    with compiled_blocks(model, dynamic=False, backend="aot_eager") as mods:
        assert all("forward" in m.__dict__ for m in mods)
        out, gout = _loss_grads(model, ids, media)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs > 0
        _loss_grads(model, ids, media)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
        # decoding: the decoder layers get a KV cache and run eager (one graph per layer
        # otherwise); the same tokens
        model.eval()
        att = torch.ones_like(ids)
        with torch.no_grad():
            gen = model.generate(ids[:, :6], att[:, :6], media=media, max_new_tokens=3)
    assert not any("forward" in m.__dict__ for m in repeated_blocks(model))
    with torch.no_grad():
        assert torch.equal(gen, model.generate(ids[:, :6], att[:, :6], media=media, max_new_tokens=3))
    torch.testing.assert_close(out, ref)
    for a, b in zip(gout, gref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_inductor_blocks_match_eager_without_recompiling():
    """The bench's compile pass (TorchInductor, fixed shapes): same loss and gradients."""
    import torch._dynamo

    from mm.bench import SHAPES, build_ours, inputs, set_trainable_ours

    s = SHAPES["micro"]
    model = build_ours(s, torch.device("cpu"), torch.float32)
    open_gates(model, 0.5)
    x = inputs(s, s.train_batch, s.train_len, torch.device("cpu"), torch.float32)
    params = set_trainable_ours(model, False)
    model.train()

    def loss_grads():
        loss = model.loss(x["ids"], x["ids"], attention_mask=x["att"], media=x["media"])
        return loss, [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]

    ref, gref = loss_grads()
    torch._dynamo.reset()
    with compiled_blocks(model, dynamic=False, encoders=True):
        loss_grads()
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        out, gout = loss_grads()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # nothing recompiled
    assert all("forward" not in m.__dict__ for m in model.layers)
    torch.testing.assert_close(out, ref)
    for a, b in zip(gout, gref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_decoder_calls_with_a_kv_cache_run_eager(monkeypatch):
    """A layer given a KV cache (a shared prefix, decoding) is not compiled: the cache is
    indexed by the layer's number, so each layer would need a graph of its own."""
    import mm.compile

    model, ids, media = _model_and_batch()
    seen = []
    real = torch.compile

    def spy(fn, **kw):
        compiled = real(fn, **kw)

        def call(*a, **k):
            seen.append(fn.__self__)
            return compiled(*a, **k)
        return call

    monkeypatch.setattr(mm.compile.torch, "compile", spy)
    layers = {id(m) for m in model.layers}
    with compiled_blocks(model, backend="eager"):
        _loss_grads(model, ids, media)
        assert sum(id(m) in layers for m in seen) == len(layers)  # no cache: compiled
        seen.clear()
        model.eval()
        with torch.no_grad():
            model.generate(ids[:, :6], torch.ones_like(ids[:, :6]), media=media, max_new_tokens=2)
        assert seen and not any(id(m) in layers for m in seen)  # adapters yes, layers eager
