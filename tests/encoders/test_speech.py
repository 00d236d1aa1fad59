"""Speech features, frame stacking, rotary Conformer and the SpeechEncoder presets."""

import ast
import pathlib
import resource

import pytest
import torch

from adapters.speech import speech_adapter_tiny
from encoders.conformer import RotarySelfAttention, conformer, depthwise_conv
from encoders.speech import SpeechEncoder, speech_encoder, speech_encoder_llama3, speech_encoder_tiny
from encoders.speech_features import FrameStacker, log_mel_fbank, num_fbank_frames, pad_waveforms, spec_augment

ROOT = pathlib.Path(__file__).resolve().parents[2]


def waveforms(seconds=(0.7, 1.33, 2.1), seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in seconds:
        n = int(s * 16_000)
        t = torch.arange(n) / 16_000
        out.append(0.3 * torch.sin(2 * torch.pi * 220 * t * (1 + t)) + 0.05 * torch.randn(n, generator=gen))
    return out


def tiny_encoder(seed=0) -> SpeechEncoder:
    torch.manual_seed(seed)
    return speech_encoder_tiny().eval()


def test_fbank_shapes_and_batch_independence():
    waves = waveforms()
    padded, lengths = pad_waveforms(waves)
    feats, frames = log_mel_fbank(padded, lengths)
    assert feats.shape == (3, int(frames.max()), 80)
    assert frames.tolist() == [(len(w) - 400) // 160 + 1 for w in waves]
    assert num_fbank_frames(399) == 0 and num_fbank_frames(400) == 1 and num_fbank_frames(560) == 2
    for i, w in enumerate(waves):
        alone, n = log_mel_fbank(w[None], torch.tensor([len(w)]))
        torch.testing.assert_close(feats[i, : n[0]], alone[0], atol=1e-4, rtol=1e-5)
        assert not feats[i, n[0] :].any()


def test_frame_stacker_lengths_and_padding():
    torch.manual_seed(0)
    stacker = FrameStacker(dim=16)
    x = torch.randn(2, 10, 80)
    lengths = torch.tensor([10, 5])
    y, out_lengths = stacker(x, lengths)
    assert y.shape == (2, 3, 16) and out_lengths.tolist() == [3, 2]
    assert not y[1, 2:].any()
    garbage = x.clone()
    garbage[1, 5:] = 1e3  # padded frames must not matter
    torch.testing.assert_close(stacker(garbage, lengths)[0], y)
    alone, _ = stacker(x[1:, :5], lengths[1:])
    torch.testing.assert_close(alone[0], y[1, :2])


def test_spec_augment_masks_warps_and_keeps_padding():
    x = torch.randn(3, 200, 80)
    lengths = torch.tensor([200, 120, 0])
    x[1, 120:] = 0
    x[2] = 0
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    y = spec_augment(x, lengths, gen(), freq_masks=2, freq_width=15, time_masks=2, time_width=0.05)
    assert torch.equal(y, spec_augment(x, lengths, gen(), freq_masks=2, freq_width=15, time_masks=2,
                                       time_width=0.05))  # a function of the generator
    assert not torch.equal(y, x) and not x[1, 120:].any() and x[0].all()  # input untouched
    assert not y[1, 120:].any() and not y[2].any()  # padding stays zero
    changed = y[:2] != x[:2]
    assert bool((~changed | (y[:2] == 0)).all())  # masking only zeroes values
    zero_bins = (y[0] == 0).all(0).sum()
    zero_frames = (y[0] == 0).all(1).sum()
    assert 0 < zero_bins <= 30 and zero_frames <= 2 * 10  # at most 2 x 15 bins, 2 x 5% of frames
    off = spec_augment(x, lengths, gen(), freq_masks=0, time_masks=0)
    assert torch.equal(off, x)
    # the warp moves energy along the mel axis: a peak at bin 40 moves by up to +-10% of its index
    peak = torch.zeros(1, 10, 80)
    peak[..., 40] = 1.0
    moved = [int(spec_augment(peak, torch.tensor([10]), torch.Generator().manual_seed(s), freq_masks=0,
                              time_masks=0, warp=0.1)[0, 0].argmax()) for s in range(20)]
    assert all(36 <= m <= 44 for m in moved) and len(set(moved)) > 1


def test_encoder_forward_shapes_and_mask():
    enc = tiny_encoder()
    feats, lengths = enc.featurize(waveforms())
    out, mask = enc(feats, lengths)
    assert out.shape == (3, (feats.shape[1] + 3) // 4, enc.dim)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == ((lengths + 3) // 4).tolist()
    assert not out[~mask].any() and torch.isfinite(out).all()


def test_padding_does_not_leak_into_valid_frames():
    enc = tiny_encoder()
    feats, lengths = enc.featurize(waveforms())
    out, mask = enc(feats, lengths)
    garbage = feats.clone()
    garbage[0, lengths[0] :] = torch.randn_like(garbage[0, lengths[0] :]) * 100
    out2, _ = enc(garbage, lengths)
    torch.testing.assert_close(out2[mask], out[mask])


def test_depthwise_conv_is_the_conv1d_it_replaces():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(24, 24, 7, padding=3, groups=24)
    x = torch.randn(3, 19, 24, requires_grad=True)  # (b, m, d)
    y = depthwise_conv(x, conv)
    ref = conv(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_rotary_position_matters():
    torch.manual_seed(0)
    attn = RotarySelfAttention(dim=32, num_heads=4).eval()
    x = torch.randn(1, 12, 32)
    mask = torch.ones(1, 12, dtype=torch.bool)
    perm = torch.randperm(12)
    # Without positions attention is permutation-equivariant; rotary breaks that.
    assert not torch.allclose(attn(x[:, perm], mask), attn(x, mask)[:, perm], atol=1e-4)
    # With a kernel-1 conv only rotary carries position through a whole Conformer block.
    block = conformer(dim=32, num_layers=1, num_heads=4, ffn_dim=64, kernel_size=1).eval()
    enc_out = block(x, mask)
    assert not torch.allclose(block(x[:, perm], mask), enc_out[:, perm], atol=1e-4)


def test_batched_equals_unbatched_encoder_and_adapter():
    enc = tiny_encoder()
    torch.manual_seed(1)
    adapter = speech_adapter_tiny(llm_dim=48).eval()
    waves = waveforms((0.73, 2.0, 1.21, 0.31)) + [torch.zeros(9_000)]  # silence is valid
    with torch.no_grad():
        feats, lengths = enc.featurize(waves)
        emb, mask = adapter(*enc(feats, lengths))
        for i, w in enumerate(waves):
            f1, l1 = enc.featurize([w])
            e1, m1 = adapter(*enc(f1, l1))
            n = int(m1.sum())
            assert int(mask[i].sum()) == n == e1.shape[1]
            torch.testing.assert_close(emb[i, :n], e1[0], atol=1e-5, rtol=0)
            assert torch.equal(emb[i, :n].argmax(-1), e1[0].argmax(-1))
            assert not emb[i, n:].any()


def test_conformer_on_valid_frames_only_matches_the_padded_layout():
    """Conformer runs its blocks on the packed valid frames; the same blocks applied on the
    padded (b, m, d) layout, op by op as the block's formula says, give the same outputs and
    gradients up to float rounding, and padded frames stay zero."""
    torch.manual_seed(0)
    enc = conformer(dim=32, num_layers=2, num_heads=4, ffn_dim=64, kernel_size=5)
    lengths = torch.tensor([11, 4, 9, 0])
    mask = torch.arange(11)[None] < lengths[:, None]
    x = torch.randn(4, 11, 32)
    x[~mask] = 7.0  # whatever padding holds must not matter

    def padded(h):
        for blk in enc.blocks:
            h = h + 0.5 * blk.ffn1(h)
            h = h + blk.attn(blk.attn_norm(h), mask)
            c = blk.conv  # its ops on the padded layout, padding zeroed before the depthwise conv
            y = torch.nn.functional.glu(c.pointwise_in(c.norm(h)), dim=-1) * mask[..., None]
            y = c.depthwise(y.transpose(1, 2)).transpose(1, 2)
            h = h + c.pointwise_out(torch.nn.functional.silu(c.conv_norm(y)))
            h = h + 0.5 * blk.ffn2(h)
            h = blk.final_norm(h) * mask[..., None]
        return h

    outs, grads = [], []
    for fn in (lambda h: enc(h, mask), padded):
        xg = x.clone().requires_grad_()
        out = fn(xg)
        (out * torch.linspace(-1, 1, 32)).square().sum().backward()
        outs.append(out.detach())
        grads.append([xg.grad] + [p.grad.clone() for p in enc.parameters()])
        enc.zero_grad()
    assert not outs[0][~mask].any()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not grads[0][0][~mask].any()  # padding gets no gradient
    # a block called on its own takes and returns the padded layout
    blk_out = enc.blocks[0](x, mask)
    assert blk_out.shape == x.shape and not blk_out[~mask].any()


def test_too_short_audio_gives_empty_mask_not_nan():
    enc = tiny_encoder()
    feats, lengths = enc.featurize([torch.zeros(100), torch.randn(16_000) * 0.1])
    out, mask = enc(feats, lengths)
    assert lengths[0] == 0 and not mask[0].any() and torch.isfinite(out).all()


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    enc = speech_encoder(dim=32, num_layers=2, num_heads=2, ffn_dim=64, kernel_size=3)
    feats, lengths = enc.featurize(waveforms((0.5, 0.8)))
    grads = []
    for flag in (False, True):
        enc.zero_grad()
        enc.conformer.activation_checkpointing = flag
        enc.train()
        out, mask = enc(feats, lengths)
        out[mask].pow(2).mean().backward()
        grads.append(enc.stacker.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_zero_branch_init_starts_each_block_as_its_final_norm():
    # branch_init=0: every residual branch's last layer is zero, so the encoder starts as the
    # final LayerNorms over the stacked features' projection; nothing else changes, the
    # branches' last layers get gradients, and scale 1 is the default initialisation
    torch.manual_seed(0)
    default = speech_encoder_tiny()
    torch.manual_seed(0)
    zero = speech_encoder_tiny(branch_init=0.0)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), speech_encoder_tiny(branch_init=1.0).parameters()))
    branch = {f"conformer.blocks.{i}.{n}" for i in range(4)
              for n in ("ffn1.net.4.weight", "ffn1.net.4.bias", "attn.out.weight", "attn.out.bias",
                        "conv.pointwise_out.weight", "conv.pointwise_out.bias",
                        "ffn2.net.4.weight", "ffn2.net.4.bias")}
    p0, p1 = dict(default.named_parameters()), dict(zero.named_parameters())
    assert branch <= p1.keys()
    for name, w in p1.items():
        if name in branch:
            assert not w.any() and p0[name].any(), name
        else:
            assert torch.equal(w, p0[name]), name
    feats, lengths = zero.featurize(waveforms())
    out, mask = zero(feats, lengths)
    x, _ = zero.stacker(feats, lengths)
    for block in zero.conformer.blocks:
        x = block.final_norm(x) * mask[..., None]
    torch.testing.assert_close(out, x)
    target = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(0))
    (out[mask] @ target).square().mean().backward()
    assert all(p1[name].grad.abs().max() > 1e-3 for name in branch if name.endswith("weight"))


def test_tiny_preset_size():
    enc = speech_encoder_tiny()
    assert enc.dim == 144 and len(enc.conformer.blocks) == 4
    assert sum(p.numel() for p in enc.parameters()) == 1_979_856


def test_llama3_preset_size_on_meta_device():
    with torch.device("meta"):
        enc = speech_encoder_llama3()
    assert enc.dim == 1536 and len(enc.conformer.blocks) == 24
    assert enc.conformer.blocks[0].attn.num_heads == 24
    assert enc.conformer.blocks[0].conv.depthwise.kernel_size == (7,)
    assert sum(p.numel() for p in enc.parameters()) == pytest.approx(1.0e9, rel=0.01)


def test_encoders_and_adapters_never_import_mm():
    for rel in ["encoders/audio.py", "encoders/speech_features.py", "encoders/conformer.py",
                "encoders/best_rq.py", "encoders/speech.py", "adapters/speech.py"]:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "mm" or n.startswith("mm.") for n in names), rel


@pytest.mark.slow
def test_llama3_encoder_forward_backward_on_cpu():
    """1B parameters: ~4 GB weights + ~4 GB grads in fp32; peak RSS is printed (needs < 24 GiB)."""
    torch.manual_seed(0)
    enc = speech_encoder_llama3(activation_checkpointing=True).train()
    feats, lengths = enc.featurize([torch.randn(16_000) * 0.1, torch.randn(12_000) * 0.1])
    out, mask = enc(feats, lengths)
    assert out.shape == (2, 25, 1536)
    out[mask].pow(2).mean().backward()
    assert all(p.grad is not None for p in enc.parameters())
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"llama3 speech encoder forward+backward peak RSS: {peak_gib:.1f} GiB")
    assert peak_gib < 20
