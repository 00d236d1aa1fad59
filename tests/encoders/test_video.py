"""Perceiver resampler (temporal aggregator) and the video encoder, at tiny sizes on CPU."""

import pytest
import torch
from torch import nn

from encoders.video import (
    FRAMES_PER_GROUP,
    PerceiverResampler,
    VideoEncoder,
    video_aggregator,
    video_aggregator_tiny,
    video_encoder,
)

D, N, K = 32, 4, 4  # width, tokens per frame (= latents per group), frames per group


class PatchEncoder(nn.Module):
    """Stand-in image encoder: 4x4 patches of an 8x8 image -> (N, 4, D); counts its calls."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, D, kernel_size=4, stride=4)
        self.dropout = nn.Dropout(0.5)
        self.batch_sizes = []

    def forward(self, pixels):
        self.batch_sizes.append(pixels.shape[0])
        return self.dropout(self.proj(pixels).flatten(2).transpose(1, 2))  # (N, 4, D)


def make_aggregator(seed=0, **kwargs):
    torch.manual_seed(seed)
    return video_aggregator_tiny(dim=D, num_latents=N, frames_per_group=K, **kwargs).eval()


def features(b, f, seed=1):
    return torch.randn(b, f, N, D, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_group_masks():
    agg = make_aggregator()
    x = features(2, 10)  # 10 frames -> g = 3 groups of 4 (the last one padded)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 5:] = False  # sample 0: groups 0 (4 frames) and 1 (1 frame) valid, group 2 empty
    tokens, token_mask = agg(x, mask)
    assert tokens.shape == (2, 3 * N, D) and token_mask.shape == (2, 3 * N)
    assert token_mask.dtype == torch.bool
    assert token_mask[0].tolist() == [True] * 2 * N + [False] * N
    assert token_mask[1].all()
    assert torch.isfinite(tokens).all()
    assert (tokens[0, 2 * N:] == 0).all()


def test_no_mask_means_all_frames_valid():
    agg = make_aggregator()
    x = features(1, 8)
    tokens, token_mask = agg(x)
    assert token_mask.all()
    torch.testing.assert_close(tokens, agg(x, torch.ones(1, 8, dtype=torch.bool))[0])


def test_batched_equals_unbatched():
    agg = make_aggregator()
    x = features(2, 12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 3:] = False  # sample 0 has 3 frames: 1 group alone, 3 groups when batched
    x[0, 3:] = float("nan")  # whatever sits in masked frames must not matter
    tokens, token_mask = agg(x, mask)
    alone0, mask0 = agg(x[:1, :3])
    alone1, _ = agg(x[1:])
    assert mask0.all() and alone0.shape == (1, N, D)
    torch.testing.assert_close(tokens[:1, :N], alone0, atol=1e-5, rtol=1e-5)
    assert not token_mask[0, N:].any() and (tokens[0, N:] == 0).all()
    torch.testing.assert_close(tokens[1:], alone1, atol=1e-5, rtol=1e-5)


def test_groups_do_not_see_each_other():
    agg = make_aggregator()
    x = features(1, 8)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 4, N, D)  # change group 1 only
    a, _ = agg(x)
    b, _ = agg(y)
    torch.testing.assert_close(a[:, :N], b[:, :N])
    assert not torch.allclose(a[:, N:], b[:, N:])


def test_masked_frames_inside_a_group_are_ignored():
    agg = make_aggregator()
    x = features(1, 4)
    mask = torch.tensor([[True, True, False, True]])
    y = x.clone()
    y[:, 2] = 1e4
    torch.testing.assert_close(agg(x, mask)[0], agg(y, mask)[0])


def test_frame_position_embedding_makes_order_matter():
    agg = make_aggregator()
    x = features(1, 4)
    forward, _ = agg(x)
    backward, _ = agg(x.flip(1))  # same frames, reversed within the group
    assert not torch.allclose(forward, backward, atol=1e-4)
    with torch.no_grad():
        agg.frame_pos.zero_()  # without it attention is blind to frame order
    torch.testing.assert_close(agg(x)[0], agg(x.flip(1))[0], atol=1e-5, rtol=1e-5)


def test_video_encoder_batched_call_on_valid_frames_only():
    torch.manual_seed(0)
    image = PatchEncoder().eval()
    enc = video_encoder(image_encoder=image, aggregator=make_aggregator()).eval()
    frames = torch.randn(2, 6, 3, 8, 8)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    feats, feat_mask = enc(frames, mask)
    assert image.batch_sizes == [8]  # one call, valid frames of the whole batch
    assert feats.shape == (2, 2 * N, D) and feat_mask.shape == (2, 2 * N)
    assert feat_mask[0].all() and feat_mask[1].tolist() == [True] * N + [False] * N
    alone, _ = enc(frames[1:, :2])
    torch.testing.assert_close(feats[1:, :N], alone, atol=1e-5, rtol=1e-5)


def test_video_encoder_with_no_valid_frame():
    enc = video_encoder(image_encoder=PatchEncoder(), aggregator=make_aggregator()).eval()
    feats, feat_mask = enc(torch.randn(1, 3, 3, 8, 8), torch.zeros(1, 3, dtype=torch.bool))
    assert feats.shape == (1, N, D) and not feat_mask.any() and (feats == 0).all()


def test_frozen_image_encoder_gets_no_gradient():
    torch.manual_seed(0)
    image = PatchEncoder()
    enc = video_encoder(
        image_encoder=image, aggregator=make_aggregator(), freeze_image_encoder=True
    )
    enc.train()
    assert not image.training and enc.aggregator.training  # frozen encoder stays in eval mode
    assert not any(p.requires_grad for p in image.parameters())
    frames = torch.randn(2, 5, 3, 8, 8)
    feats, mask = enc(frames, torch.ones(2, 5, dtype=torch.bool))
    (feats * mask[..., None]).square().mean().backward()
    assert all(p.grad is None for p in image.parameters())
    grads = {name: p.grad for name, p in enc.aggregator.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["latents"].abs().sum() > 0 and grads["frame_pos"].abs().sum() > 0


def test_trainable_image_encoder_gets_gradient():
    torch.manual_seed(0)
    image = PatchEncoder()
    enc = video_encoder(image_encoder=image, aggregator=make_aggregator()).train()
    feats, _ = enc(torch.randn(1, 4, 3, 8, 8))
    feats.square().mean().backward()
    assert image.proj.weight.grad is not None and image.proj.weight.grad.abs().sum() > 0


def test_builders_are_keyword_only_and_validate():
    agg = video_aggregator(
        dim=64, num_latents=8, frames_per_group=FRAMES_PER_GROUP["finetune"], num_heads=4
    )
    assert isinstance(agg, PerceiverResampler)
    assert agg.frames_per_group == 32 and agg.frame_pos.shape == (32, 64)
    assert FRAMES_PER_GROUP == {"pretrain": 16, "finetune": 32}
    assert video_aggregator(dim=64, num_latents=8, num_heads=4).frames_per_group == 16
    with pytest.raises(TypeError):
        video_aggregator(64, 8)  # noqa
    with pytest.raises(ValueError, match="divisible"):
        video_aggregator(dim=30, num_latents=4, num_heads=4)
    with pytest.raises(ValueError, match="frame_mask shape"):
        make_aggregator()(features(1, 4), torch.ones(1, 5, dtype=torch.bool))
    assert isinstance(video_encoder(image_encoder=nn.Identity(), aggregator=agg), VideoEncoder)
