"""The image encoder's gated global layers: key masks across tiles."""

import torch

from encoders.image import GatedBlock, image_encoder


def test_gated_block_without_a_mask_equals_an_all_true_mask():
    torch.manual_seed(0)
    blk = GatedBlock(dim=32, n_heads=2, gate_init=0.5)
    x = torch.randn(3, 17, 32)
    full = torch.ones(3, 17, dtype=torch.bool)
    torch.testing.assert_close(blk(x, None), blk(x, full))


def _encoder(max_tiles):
    torch.manual_seed(0)
    enc = image_encoder(preset="tiny", out_dim=24, tile_size=16, max_tiles=max_tiles, gated_layers=2, gate_init=0.5,
                        vit={"patch_size": 8, "width": 32, "layers": 2, "head_width": 16})
    with torch.no_grad():
        enc.tile_gate.fill_(0.5)
        enc.tile_embed.normal_()
    return enc.eval()


def test_a_padded_tile_changes_no_valid_tile():
    enc = _encoder(max_tiles=2)
    pix = torch.randn(2, 2, 3, 16, 16)
    tile_mask = torch.tensor([[True, False], [True, True]])
    aspect = torch.zeros(2, dtype=torch.long)
    a, mask = enc(pix, tile_mask, aspect)
    pix2 = pix.clone()
    pix2[0, 1] = torch.randn(3, 16, 16) * 5  # other content in the padded tile
    b, _ = enc(pix2, tile_mask, aspect)
    p = a.shape[1] // 2
    assert mask[0, :p].all() and not mask[0, p:].any()
    torch.testing.assert_close(a[0, :p], b[0, :p])
    assert not torch.allclose(a[0, p:], b[0, p:])  # the padded tile itself did change
    torch.testing.assert_close(a[1], b[1])


def test_one_tile_images_match_the_masked_computation():
    """With one tile the global layers run without a key mask (the fused attention kernels);
    a valid image's features are those of the masked computation."""
    enc = _encoder(max_tiles=1)
    pix = torch.randn(3, 1, 3, 16, 16)
    tile_mask = torch.tensor([[True], [False], [True]])
    aspect = torch.zeros(3, dtype=torch.long)
    feats, mask = enc(pix, tile_mask, aspect)
    assert mask.tolist() == [[True] * 5, [False] * 5, [True] * 5]
    # the masked computation, block by block
    out = enc.vit.forward_intermediates(pix.flatten(0, 1), indices=enc.layer_indices + [1], output_fmt="NLC",
                                        intermediates_only=True, output_extra_tokens=True)
    layers = [torch.cat([c, x], dim=1) for c, x in zip(out["image_intermediates_prefix"], out["image_intermediates"])]
    x = layers[-1] + enc.tile_gate.tanh() * enc.tile_embed[aspect][:, :1].expand(3, 5, -1)
    for blk in enc.blocks:
        x = blk(x, mask)
    ref = enc.proj(enc.norm(torch.cat([x] + layers[:-1], dim=-1)))
    torch.testing.assert_close(feats[mask], ref[mask])
    assert torch.isfinite(feats).all()


def test_gated_block_gives_attention_a_contiguous_mask(monkeypatch):
    """An expanded (stride-0) key mask sends CUDA SDPA to its math path (scripts/sdpa_paths.py):
    the block hands attention a contiguous copy, with the same result."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    torch.manual_seed(0)
    blk = GatedBlock(dim=32, n_heads=2, gate_init=0.5)
    x = torch.randn(3, 17, 32)
    expanded = torch.tensor([True, True, False])[:, None].expand(3, 17)  # stride 0 along the keys
    assert expanded.stride(-1) == 0
    want = blk(x, expanded.clone())
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    got = blk(x, expanded)
    assert seen and seen[0].stride(-1) == 1
    torch.testing.assert_close(got, want)
