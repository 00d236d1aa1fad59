"""BEST-RQ: span masks, frozen random-projection targets, masked multi-softmax loss."""

import torch
import torch.nn.functional as F

from encoders.best_rq import (
    RandomProjectionQuantizer,
    best_rq_llama3,
    best_rq_tiny,
    expand_spans,
    multi_softmax_loss,
    span_mask,
    stacked_mask,
)
from encoders.speech import speech_encoder


def small_encoder():
    torch.manual_seed(0)
    return speech_encoder(dim=32, num_layers=1, num_heads=2, ffn_dim=64, kernel_size=3)


def test_expand_spans_and_stacked_mask_by_hand():
    starts = torch.zeros(1, 12, dtype=torch.bool)
    starts[0, [2, 9]] = True
    assert expand_spans(starts, 3)[0].nonzero().flatten().tolist() == [2, 3, 4, 9, 10, 11]
    frames = torch.tensor([[0, 0, 1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert stacked_mask(frames, 4).tolist() == [[True, False, True]]


def test_span_mask_respects_lengths_and_rate():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([4000, 1500])
    mask = span_mask(lengths, 4000, prob=0.025, span=32, generator=gen)
    assert not mask[1, 1500:].any()
    expected = 1 - (1 - 0.025) ** 32  # ~55 % of frames (Llama 3 values)
    assert abs(mask[0].float().mean().item() - expected) < 0.08
    assert not span_mask(lengths, 4000, prob=0.0, span=8).any()
    assert span_mask(lengths, 4000, prob=1.0, span=1).sum(1).tolist() == [4000, 1500]


def test_quantizer_hand_computed_targets():
    q = RandomProjectionQuantizer(num_codebooks=2, codebook_size=3, code_dim=2, in_dim=1, stride=2)
    q.projection.copy_(torch.eye(2))  # stacked (x0, x1) -> (x0, x1)
    q.codebooks.copy_(torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]],  # east, north, west
        [[0.6, 0.8], [0.8, -0.6], [-0.6, -0.8]],
    ]))
    # Frames stack into pairs (2, -0.1), (0.1, 3), (-1, -0.2), (0.5, 0): frame 7 is padding,
    # zeroed before stacking (kept, 9.0 would flip the last pair's second code to 0).
    # Cosines, codebook 0: pair 1 nearest east, 2 north, 3 west, 4 east.
    # Codebook 1 dot products: (1.12, 1.66, -1.12), (2.46, -1.72, -2.46),
    # (-0.76, -0.68, 0.76), (0.3, 0.4, -0.3).
    features = torch.tensor([[2.0, -0.1, 0.1, 3.0, -1.0, -0.2, 0.5, 9.0]])[..., None]  # (1, 8, 1)
    targets = q(features, torch.tensor([7]))
    assert targets.tolist() == [[[0, 1], [1, 0], [2, 2], [0, 1]]]


def test_frozen_parts_are_seeded_buffers_unchanged_by_training():
    model = best_rq_tiny(encoder=small_encoder(), seed=3)
    again = best_rq_tiny(encoder=small_encoder(), seed=3)
    other = best_rq_tiny(encoder=small_encoder(), seed=4)
    assert torch.equal(model.quantizer.codebooks, again.quantizer.codebooks)
    assert not torch.equal(model.quantizer.projection, other.quantizer.projection)
    params = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("quantizer.") for n in params)
    assert {"quantizer.projection", "quantizer.codebooks"} <= set(model.state_dict())
    torch.testing.assert_close(model.quantizer.codebooks.norm(dim=-1), torch.ones(4, 256))

    frozen = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    head = model.heads.weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    feats, lengths = torch.randn(2, 120, 80), torch.tensor([120, 90])
    for _ in range(2):
        opt.zero_grad()
        model(feats, lengths, generator=gen).loss.backward()
        opt.step()
    for k, v in model.quantizer.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not torch.equal(model.heads.weight, head)

    restored = best_rq_tiny(encoder=small_encoder(), seed=99)
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.quantizer.codebooks, model.quantizer.codebooks)


def test_loss_counts_masked_frames_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, 7)
    targets = torch.randint(0, 7, (2, 5, 3))
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    loss, acc = multi_softmax_loss(logits, targets, mask)
    expected = F.cross_entropy(logits[mask].reshape(-1, 7), targets[mask].reshape(-1))
    torch.testing.assert_close(loss, expected)
    changed = logits.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    torch.testing.assert_close(multi_softmax_loss(changed, targets, mask)[0], loss)
    changed[0, 0, :, 0] += 5.0  # a masked frame's logits
    assert not torch.allclose(multi_softmax_loss(changed, targets, mask)[0], loss)
    empty = torch.zeros(2, 5, dtype=torch.bool)
    assert multi_softmax_loss(logits, targets, empty)[0].item() == 0.0


def test_encoder_sees_noise_at_masked_frames_and_gradient_only_from_them():
    model = best_rq_tiny(encoder=small_encoder())
    seen = {}

    def capture(module, args, output):
        seen["input"] = args[0]
        output[0].retain_grad()
        seen["hidden"] = output[0]

    model.encoder.register_forward_hook(capture)
    feats, lengths = torch.randn(2, 200, 80), torch.tensor([200, 150])
    out = model(feats, lengths, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    fm = out.frame_mask
    assert out.num_masked > 0 and fm.any() and not fm[1, 150:].any()
    assert torch.equal(seen["input"][~fm], feats[~fm])
    assert not torch.isclose(seen["input"][fm], feats[fm]).any()
    grad = seen["hidden"].grad.abs().sum(-1)  # (b, m)
    assert (grad[out.target_mask] > 0).all() and not grad[~out.target_mask].any()


def test_tiny_objective_learns():
    model = best_rq_tiny(encoder=small_encoder())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    feats, lengths = torch.randn(4, 100, 80), torch.tensor([100, 100, 80, 60])
    losses = []
    for step in range(8):
        opt.zero_grad()
        out = model(feats, lengths, generator=torch.Generator().manual_seed(step % 2))
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_llama3_preset_values():
    model = best_rq_llama3(encoder=small_encoder())
    q = model.quantizer
    assert q.codebooks.shape == (16, 8192, 16) and q.projection.shape == (320, 16)
    assert (model.mask_prob, model.mask_span) == (0.025, 32)
    assert model.heads.out_features == 16 * 8192
