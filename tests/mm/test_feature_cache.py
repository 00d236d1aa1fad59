"""Cached features of a fixed encoder part (``feature_cache:``, mm.modality.FeatureCache)."""

import json

import pytest
import torch
from torch import nn

from encoders.image import image_encoder
from encoders.video import VideoEncoder, video_aggregator_tiny
from mm.data import media_key
from mm.modality import FeatureCache, Modality
from mm.train import train


def _encoder(gated=1, max_tiles=2):
    torch.manual_seed(0)
    enc = image_encoder(preset="tiny", out_dim=24, tile_size=16, max_tiles=max_tiles, gated_layers=gated,
                        vit={"patch_size": 8})
    with torch.no_grad():  # gates away from zero, so the gated layers change what they get
        for blk in enc.blocks:
            blk.gate_attn.fill_(0.5)
            blk.gate_mlp.fill_(-0.4)
        enc.tile_gate.fill_(0.3)
        enc.tile_embed.normal_()
    return enc


def _inputs(b=3, T=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    tile_mask = torch.ones(b, T, dtype=torch.bool)
    tile_mask[0, 1:] = False  # a padded tile: the multi-tile key mask path
    return {"pixels": torch.randn(b, T, 3, 16, 16, generator=g), "tile_mask": tile_mask,
            "aspect": torch.zeros(b, dtype=torch.long)}


def _freeze(enc, trainable=()):
    for n, p in enc.named_parameters():
        p.requires_grad_(any(n.startswith(t) for t in trainable))


@pytest.mark.parametrize("cut", ["vit", "blocks"])
def test_image_encoder_parts_give_forward(cut):
    enc = _encoder().eval()
    x = _inputs()
    with torch.no_grad():
        want, wmask = enc(**x)
        got, gmask = enc.head(enc.trunk(**x, cut=cut), **x, cut=cut)
    assert torch.equal(gmask, wmask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_image_cache_cut_follows_what_trains():
    enc = _encoder().eval()
    _freeze(enc, ["vit"])
    assert enc.cache_cut() is None
    _freeze(enc, ["blocks", "norm", "proj", "tile_embed", "tile_gate"])  # the demo's adapter stage
    assert enc.cache_cut() == "vit"
    _freeze(enc, ["norm", "proj"])  # encoder frozen (the bench's frozen mode)
    assert enc.cache_cut() == "blocks"
    _freeze(enc, ["norm", "proj", "tile_gate"])
    assert enc.cache_cut() == "vit"
    enc.vit.train()
    enc.vit.transformer.resblocks[0].mlp.add_module("drop", nn.Dropout(0.1))  # active dropout: not fixed
    assert enc.cache_cut() is None
    enc.vit.eval()
    assert enc.cache_cut() == "vit"


def _count_trunk_rows(enc):
    rows = []
    real = enc.trunk

    def trunk(*a, **kw):
        out = real(*a, **kw)
        rows.append(out.shape[0])
        return out
    enc.trunk = trunk
    return rows


def test_modality_encode_reuses_cached_items_with_the_same_features_and_gradients():
    enc = _encoder().eval()
    mod = Modality(kind="xattn", encoder=enc, xattn={0: nn.Identity()})
    _freeze(enc, ["blocks", "norm", "proj", "tile_embed", "tile_gate"])
    x = _inputs()
    keys = [media_key({k: v[i] for k, v in x.items()}) for i in range(3)]
    assert len(set(keys)) == 3

    def loss_and_grads(keys):
        enc.zero_grad(set_to_none=True)
        f, m = mod.encode(x, keys)
        (f.square() * m[..., None]).sum().backward()
        return f.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}

    want, wgrads = loss_and_grads(None)  # no cache attached: the plain forward
    mod.feature_cache = FeatureCache(2 ** 20)
    rows = _count_trunk_rows(enc)
    for _ in range(2):  # first all misses, then all hits
        got, grads = loss_and_grads(keys)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        for n in wgrads:
            torch.testing.assert_close(grads[n], wgrads[n], rtol=1e-5, atol=1e-6)
    assert rows == [3] and mod.feature_cache.stats() | {"mib": 0} == {"items": 3, "mib": 0, "hits": 3, "misses": 3}
    # a batch with one new item runs the trunk on that item only
    x2 = {k: torch.cat([v[:2], _inputs(seed=7)[k][:1]]) for k, v in x.items()}
    keys2 = [media_key({k: v[i] for k, v in x2.items()}) for i in range(3)]
    assert keys2[:2] == keys[:2] and keys2[2] != keys[2]
    got, _ = mod.encode(x2, keys2)
    assert rows == [3, 1]
    with torch.no_grad():
        torch.testing.assert_close(got, enc(**x2)[0], rtol=0, atol=1e-6)
    # no keys, or nothing fixed: the plain forward
    mod.encode(x, None)
    _freeze(enc, ["vit"])
    mod.encode(x, keys)
    assert rows == [3, 1]


def test_feature_cache_evicts_least_recently_used_beyond_its_bytes():
    c = FeatureCache(3 * 400)
    for i in range(3):
        c.put(("vit", i), torch.zeros(100))  # 400 bytes each
    assert c.get(("vit", 0)) is not None  # 0 is now the most recent
    c.put(("vit", 3), torch.zeros(100))
    assert c.get(("vit", 1)) is None and c.get(("vit", 0)) is not None and c.get(("vit", 3)) is not None
    c.put(("vit", 9), torch.zeros(1000))  # larger than the whole budget: not kept
    assert c.stats()["items"] == 3 and c.bytes == 1200


def test_media_key_is_the_content():
    a = {"pixels": torch.arange(12.0).view(3, 4), "aspect": torch.tensor(1)}
    assert media_key(a) == media_key({"aspect": torch.tensor(1), "pixels": torch.arange(12.0).view(3, 4)})
    assert media_key(a) != media_key({**a, "aspect": torch.tensor(2)})
    assert media_key(a) != media_key({**a, "pixels": torch.arange(12.0).view(4, 3)})  # same bytes, other shape
    assert media_key(torch.ones(2)) != media_key(torch.ones(2, dtype=torch.float64))


def test_video_encoder_parts_and_cache():
    torch.manual_seed(0)

    class Frames(nn.Module):  # any module: pixels (N, 3, H, W) -> (N, n, d)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 * 4 * 4, 2 * 8)

        def forward(self, px):
            return self.lin(px.flatten(1)).view(px.shape[0], 2, 8)

    enc = VideoEncoder(Frames(), video_aggregator_tiny(dim=8, num_latents=2, frames_per_group=2),
                       freeze_image_encoder=True)
    frames, fmask = torch.randn(2, 4, 3, 4, 4), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert enc.cache_cut() == "frames"
    want = enc(frames, fmask)
    got = enc.head(enc.trunk(frames, fmask), frames, fmask)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    mod = Modality(kind="xattn", encoder=enc, xattn={0: nn.Identity()})
    mod.feature_cache = FeatureCache(2 ** 20)
    x = {"frames": frames, "frame_mask": fmask}
    keys = [media_key({k: v[i] for k, v in x.items()}) for i in range(2)]
    for _ in range(2):
        f, m = mod.encode(x, keys)
        torch.testing.assert_close(f, want[0], rtol=0, atol=1e-6)
    assert (mod.feature_cache.hits, mod.feature_cache.misses) == (2, 2)
    enc.image_encoder.requires_grad_(True)
    assert enc.cache_cut() is None


def test_stage_with_feature_cache_trains_like_without(tmp_path, tiny_llm_dir, image_manifest):
    from tests.mm.test_train import _cfg

    runs = {}
    for name, extra in (("plain", ()), ("cached", ("feature_cache=64",))):
        out = train(_cfg(tmp_path, tiny_llm_dir, image_manifest, out=name, steps=8, extra=extra), progress=False)
        runs[name] = (json.loads((out / "summary.json").read_text()), out)
    summary = runs["cached"][0]
    fc = summary["feature_cache"]["image"]
    assert fc["hits"] > 0 and fc["misses"] > 0 and fc["items"] == fc["misses"]  # every image kept once
    assert "feature_cache" not in runs["plain"][0]
    from mm.checkpoint import load_tensors
    a = load_tensors(runs["plain"][1] / "model" / "modalities.safetensors")[0]
    b = load_tensors(runs["cached"][1] / "model" / "modalities.safetensors")[0]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
