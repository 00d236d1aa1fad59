import pytest
import torch

from tests.helpers import image_media, open_gates, tiny_image_mm, tiny_llm

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_logits_bit_identical(family):
    llm = tiny_llm(family)
    ids = torch.randint(1, 128, (2, 12))
    ref = llm(ids).logits
    model = tiny_image_mm(llm)
    open_gates(model)  # even with open gates, no media -> adapters do nothing
    assert torch.equal(model(ids), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_media_at_init_is_bit_identical(family):
    llm = tiny_llm(family)
    ids = torch.randint(1, 128, (2, 12))
    ref = llm(ids).logits
    model = tiny_image_mm(llm)
    assert torch.equal(model(ids, media={"image": image_media(2)}), ref)
    open_gates(model)
    assert not torch.allclose(model(ids, media={"image": image_media(2)}), ref)


def test_llm_state_dict_unchanged_and_loadable():
    llm = tiny_llm()
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    model = tiny_image_mm(llm)
    after = model.llm.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    fresh = tiny_llm(seed=5)
    model.llm.load_state_dict(fresh.state_dict())  # the original checkpoint loads unchanged


def test_text_before_image_gets_nothing_interleaved():
    llm = tiny_llm()
    model = tiny_image_mm(llm, every=1)
    open_gates(model)
    ids = torch.randint(1, 128, (1, 16))
    ref = llm(ids).logits
    # image 0 seen from position 5, image 1 from position 10
    media = image_media(1, 2, positions=torch.tensor([[5, 10]]))
    out = model(ids, media={"image": media})
    assert torch.equal(out[:, :5], ref[:, :5])
    assert not torch.allclose(out[:, 5:], ref[:, 5:])
    # changing image 1 changes nothing before position 10
    media2 = image_media(1, 2, positions=torch.tensor([[5, 10]]), seed=7)
    media2.inputs["pixels"][0] = media.inputs["pixels"][0]
    out2 = model(ids, media={"image": media2})
    assert torch.equal(out2[:, :10], out[:, :10])
    assert not torch.allclose(out2[:, 10:], out[:, 10:])


def test_trainable_parameter_names():
    from mm.trainable import set_trainable

    model = tiny_image_mm(tiny_llm(layers=4))
    names = set_trainable(model, ["image.xattn"])
    expected = {f"image.xattn.{i}.{p}" for i in (1, 3) for p in (
        "attn_norm.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "q_norm.weight", "k_norm.weight",
        "o_proj.weight", "attn_gate", "mlp_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "mlp_gate")}
    assert set(names) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"modalities." + n for n in expected}
    set_trainable(model, ["image"])
    assert not any(p.requires_grad for p in model.llm.parameters())
    with pytest.raises(ValueError, match="names no module"):
        set_trainable(model, ["llm"])


def test_generation_cache_matches_no_cache_and_kv_projected_once():
    llm = tiny_llm()
    model = tiny_image_mm(llm)
    open_gates(model, 0.5)
    ids = torch.randint(1, 128, (3, 9))
    att = torch.ones_like(ids)
    att[0, :3] = 0  # left padding
    ids[0, :3] = 0
    media = image_media(3, positions=torch.tensor([[2], [4], [4]]))
    model.kv_projections = 0
    a = model.generate(ids, att, media={"image": media}, max_new_tokens=8)
    assert model.kv_projections == len(model.modalities["image"].xattn)  # once per layer per generate
    b = model.generate(ids, att, media={"image": media}, max_new_tokens=8, use_cache=False)
    assert torch.equal(a, b)


def test_batched_generation_equals_one_by_one():
    llm = tiny_llm()
    model = tiny_image_mm(llm)
    open_gates(model, 0.5)
    rows = [torch.randint(1, 128, (n,)) for n in (5, 9, 7)]
    media = image_media(3, positions=torch.tensor([[1], [3], [2]]))
    t = max(len(r) for r in rows)
    ids = torch.zeros(3, t, dtype=torch.long)
    att = torch.zeros(3, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        att[i, t - len(r):] = 1
    batched = model.generate(ids, att, media={"image": media}, max_new_tokens=6)
    for i, r in enumerate(rows):
        one = image_media(1, positions=media.positions[i:i + 1])
        one.inputs = {k: v[i:i + 1] for k, v in media.inputs.items()}
        single = model.generate(r[None], torch.ones(1, len(r), dtype=torch.long), media={"image": one}, max_new_tokens=6)
        assert torch.equal(batched[i], single[0])


def test_loss_only_on_labels_and_prefix_sharing_matches_full():
    llm = tiny_llm()
    model = tiny_image_mm(llm)
    open_gates(model, 0.5)
    ids = torch.randint(1, 128, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[:, 9:] = ids[:, 9:]
    media = image_media(2, positions=torch.tensor([[6], [7]]))
    att = torch.ones_like(ids)
    shared = model.loss(ids, labels, attention_mask=att, media={"image": media})
    h, _, p, _ = model.run(ids, att, media={"image": media}, share_prefix=False)
    assert p == 0
    logits = model.logits(h)[:, :-1]
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)


def test_trunk_cache_reuses_lower_layers_with_the_same_loss_and_gradients():
    from mm.modalities.base import llm_shape
    from mm.modalities.image import build as build_image
    from mm.model import MultimodalLM, TrunkCache

    llm = tiny_llm()
    torch.manual_seed(1)
    mod = build_image(llm_shape(llm.config), encoder=dict(preset="tiny", out_dim=32), adapter=dict(every=2, first=3))
    model = MultimodalLM(llm, {"image": mod})
    assert min(mod.layer_indices) == 3
    open_gates(model, 0.5)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("modalities."))
    ids = torch.randint(1, 128, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[:, 9:] = ids[:, 9:]
    att = torch.ones_like(ids)
    media = {"image": image_media(2, positions=torch.tensor([[4], [5]]))}
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        loss = model.loss(ids, labels, attention_mask=att, media=media)
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    ref, ref_g = loss_and_grads()
    layers = list(model.decoder.layers)
    model.trunk_cache = TrunkCache(16)
    miss, miss_g = loss_and_grads()
    assert (model.trunk_cache.misses, model.trunk_cache.hits, len(model.trunk_cache.rows)) == (2, 0, 2)
    torch.testing.assert_close(miss, ref, rtol=1e-5, atol=1e-6)
    hit, hit_g = loss_and_grads()
    assert model.trunk_cache.hits == 2
    assert list(model.decoder.layers) == layers  # the real layers are back after a cached step
    torch.testing.assert_close(hit, ref, rtol=1e-5, atol=1e-6)
    assert sum(g is not None for g in ref_g) > 10
    for a, b in zip(hit_g, ref_g):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a changed token in one row: that row alone is new; the loss is still the plain one
    ids[1, 10] = (ids[1, 10] % 127) + 1
    again, _ = loss_and_grads()
    assert (model.trunk_cache.misses, model.trunk_cache.hits) == (3, 3)
    model.trunk_cache = None
    torch.testing.assert_close(again, loss_and_grads()[0], rtol=1e-5, atol=1e-6)


def _prefix_batch():
    """Three rows laid out [shared 4][padding][own prefix][image, answer]: rows 0 and 2 share
    their own prefix too; row 1 is shorter (left of its prefix, padding)."""
    shared = [5, 6, 7, 8]
    own = [[20, 21, 22], [30, 31], [20, 21, 22]]
    tail = [[40, 41, 42], [43, 44, 45], [46, 47, 48]]
    t = len(shared) + 3 + 3
    ids = torch.zeros(3, t, dtype=torch.long)
    att = torch.zeros(3, t, dtype=torch.long)
    for i in range(3):
        row = own[i] + tail[i]
        ids[i, :4], att[i, :4] = torch.tensor(shared), 1
        ids[i, t - len(row):], att[i, t - len(row):] = torch.tensor(row), 1
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    starts = (att.cumsum(-1) - 1)[:, 7:8]  # the image is seen from column 7 (the tail) on
    return ids, att, labels, image_media(3, positions=starts)


def test_prefix_cache_reuses_prompt_keys_values_with_the_same_loss_gradients_and_answers():
    from mm.model import PrefixCache, shared_text_cache

    llm = tiny_llm()
    model = tiny_image_mm(llm)
    open_gates(model, 0.5)
    ids, att, labels, media = _prefix_batch()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        loss = model.loss(ids, labels, attention_mask=att, media={"image": media})
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    ref, ref_g = loss_and_grads()
    ref_ids = model.generate(ids, att, media={"image": media}, max_new_tokens=5)
    cache = model.prefix_cache = shared_text_cache(llm, PrefixCache, 8)
    cold, _ = loss_and_grads()
    # the shared columns once, then the two distinct own prefixes; the third row hits
    assert (cache.misses, cache.hits, len(cache.rows)) == (3, 1, 3)
    warm, warm_g = loss_and_grads()
    assert (cache.misses, cache.hits) == (3, 5)
    for got in (cold, warm):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(warm_g, ref_g):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert torch.equal(model.generate(ids, att, media={"image": media}, max_new_tokens=5), ref_ids)
    assert cache.misses == 3  # generation found every prefix cached
    one = image_media(1, positions=media.positions[:1])
    one.inputs = {k: v[:1] for k, v in media.inputs.items()}
    assert torch.equal(model.generate(ids[:1], att[:1], media={"image": one}, max_new_tokens=5), ref_ids[:1])
    # another model on the same LLM object shares the cache; a full cache still computes
    other = tiny_image_mm(llm)
    assert shared_text_cache(llm, PrefixCache, 1) is cache
    full = model.prefix_cache = PrefixCache(1)
    torch.testing.assert_close(loss_and_grads()[0], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_and_grads()[0], ref, rtol=1e-5, atol=1e-6)
    assert len(full.rows) == 1
    model.prefix_cache = None
    del other
    # once the LLM moves to another device or dtype, its rows are of no use: a fresh cache
    # (a GPU stage after a CPU one in the same process took the CPU's rows)
    llm.to(torch.float64)
    moved = shared_text_cache(llm, PrefixCache, 1)
    assert moved is not cache and not moved.rows
    assert shared_text_cache(llm, PrefixCache, 1) is moved


def test_vit_custom_block_type_is_the_same_model_and_initialised_alike():
    """``vit: {block_type: custom}`` (the demo's, faster on a CPU): open_clip's own attention
    block holds the same parameters under the same names and computes the same outputs and
    gradients as the default nn.MultiheadAttention block; its q/k/v weights are drawn like
    nn.MultiheadAttention's (xavier uniform), not open_clip's larger randn scale."""
    import math

    from encoders.image import build_vit

    torch.manual_seed(0)
    plain = build_vit(preset="tiny", image_size=32, patch_size=4)
    custom = build_vit(preset="tiny", image_size=32, patch_size=4, block_type="custom")
    w = custom.transformer.resblocks[0].attn.in_proj_weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))  # xavier uniform
    assert w.abs().max() <= bound and w.std() > 0.8 * bound / math.sqrt(3)
    from open_clip.transformer import CustomResidualAttentionBlock
    assert isinstance(custom.transformer.resblocks[0], CustomResidualAttentionBlock)
    custom.load_state_dict(plain.state_dict())  # strict: the same names and shapes
    custom.set_grad_checkpointing(True)  # open_clip calls checkpoint(block, x, None, None, mask)
    x = torch.randn(3, 3, 32, 32)
    a, b = plain(x), custom(x)
    torch.testing.assert_close(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for (n, p), q in zip(plain.named_parameters(), custom.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
