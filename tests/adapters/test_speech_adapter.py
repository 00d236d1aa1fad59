"""Speech adapter: conv downsampling, rotary Transformer layer, mask-aware projection."""

import pytest
import torch

from adapters.speech import speech_adapter, speech_adapter_llama3, speech_adapter_tiny


def inputs(lengths=(9, 4, 1), dim=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = max(lengths)
    x = torch.randn(len(lengths), m, dim, generator=gen)
    mask = torch.arange(m)[None] < torch.tensor(lengths)[:, None]
    return x * mask[..., None], mask


def small_adapter():
    torch.manual_seed(0)
    return speech_adapter(encoder_dim=24, dim=32, llm_dim=40, num_heads=4, ffn_dim=64).eval()


def test_shapes_and_lengths():
    adapter = small_adapter()
    x, mask = inputs()
    emb, mask2 = adapter(x, mask)
    assert emb.shape == (3, 5, 40) and mask2.dtype == torch.bool
    assert mask2.sum(1).tolist() == [5, 2, 1]  # ceil(m / 2): 40 ms -> 80 ms
    assert not emb[~mask2].any()
    assert adapter.output_lengths(torch.tensor([0, 1, 2, 3, 4, 750])).tolist() == [0, 1, 1, 2, 2, 375]


def test_padding_never_changes_a_sample():
    adapter = small_adapter()
    x, mask = inputs()
    emb, mask2 = adapter(x, mask)
    garbage = torch.where(mask[..., None], x, torch.randn_like(x) * 100)
    torch.testing.assert_close(adapter(garbage, mask)[0], emb)
    for i in range(3):
        n = int(mask[i].sum())
        alone, mask_alone = adapter(x[i : i + 1, :n], mask[i : i + 1, :n])
        torch.testing.assert_close(alone[0], emb[i, : mask_alone.shape[1]], atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter():
    adapter = small_adapter().train()
    x, mask = inputs()
    x.requires_grad_(True)
    emb, mask2 = adapter(x, mask)
    emb[mask2].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert not x.grad[~mask].any()  # padded encoder frames get no gradient


def test_bad_input_is_a_clear_error():
    adapter = small_adapter()
    x, mask = inputs()
    with pytest.raises(ValueError, match="expects"):
        adapter(x[..., :10], mask)
    with pytest.raises(ValueError, match="mask"):
        adapter(x, mask.float())


def test_presets():
    tiny = speech_adapter_tiny(llm_dim=576)
    assert (tiny.encoder_dim, tiny.dim, tiny.llm_dim) == (144, 192, 576)
    assert sum(p.numel() for p in tiny.parameters()) == 540_992
    with torch.device("meta"):
        big = speech_adapter_llama3(llm_dim=4096)
    assert (big.encoder_dim, big.dim, big.conv.kernel_size, big.conv.stride) == (1536, 3072, (3,), (2,))
    assert big.layer.ffn.net[1].out_features == 4096
    assert sum(p.numel() for p in big.parameters()) == pytest.approx(89.7e6, rel=0.01)
