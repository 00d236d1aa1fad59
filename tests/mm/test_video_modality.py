"""The video modality wired into the model: placement, masks, text invariance, preprocessing,
bad inputs, and a short video_adapter stage on top of a tiny image run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.image_io import possible_grids
from encoders.video_io import load_video
from mm.modalities import builtin_types
from mm.modalities.base import LLMShape, llm_shape
from mm.modalities.image import build as build_image
from mm.modalities.video import VIDEO, build as build_video, image_adapter_copy, preprocess, read, video_xattn_layers
from mm.model import MediaInput, MultimodalLM
from mm.sources.moving_shapes import make_dataset, write_mp4
from tests.helpers import image_media, open_gates, tiny_llm

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
F, S = 8, 32  # frames per video, frame side (the tiny ViT's tile)
ENCODER = dict(preset="tiny", tile_size=S, max_tiles=1, out_dim=32, gated_layers=1)


def tiny_video_mm(llm, *, seed=1, frames_per_group=4):
    """Image blocks before every decoder layer, video blocks at every 2nd image block."""
    torch.manual_seed(seed)
    shape = llm_shape(llm.config)
    image = build_image(shape, encoder=ENCODER, adapter=dict(every=1))
    video = build_video(shape, encoder=ENCODER, max_frames=F,
                        aggregator=dict(frames_per_group=frames_per_group, num_latents=4, depth=1, num_heads=2),
                        adapter=dict(image_layers=dict(every=1), every_image=2))
    return MultimodalLM(llm, {"image": image, "video": video})


def video_media(b, *, frames=F, positions=None, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, F, 1, 3, S, S), generator=g, dtype=torch.uint8)
    mask = (torch.arange(F) < frames)[None].expand(b, F).clone()
    x[~mask] = 0
    pos = positions if positions is not None else torch.zeros(b, 1, dtype=torch.long)
    inputs = {"frames": x, "frame_mask": mask, "tile_mask": torch.ones(b, 1, dtype=torch.bool),
              "aspect": torch.zeros(b, dtype=torch.long)}
    return MediaInput(inputs=inputs, valid=torch.ones(b, 1, dtype=torch.bool), positions=pos)


def clip_file(path, frames, h=S, w=S):
    """An mp4 whose frame t is filled with grey level 15 * t (readable back by index)."""
    x = np.zeros((frames, h, w, 3), np.uint8)
    for t in range(frames):
        x[t] = 15 * t
    write_mp4(path, x, 8, qp=0)
    return path


# -- placement and structure ---------------------------------------------------------------
def test_video_blocks_before_every_4th_image_block():
    assert video_xattn_layers(32, image_layers=dict(every=4)) == [15, 31]  # Llama 3 8B
    assert video_xattn_layers(30, image_layers=dict(every=4, first=15)) == [27]  # the CPU demo
    assert video_xattn_layers(30, image_layers=[15, 19]) == [19]  # fewer than 4: the last one
    assert video_xattn_layers(30, layers=[20, 10]) == [10, 20]
    mod = build_video(LLMShape(64, 8, 4, 2), encoder=ENCODER, adapter=dict(image_layers=dict(every=1), every_image=4))
    assert mod.layer_indices == [3, 7]
    assert all(float(b.attn_gate) == 0 and float(b.mlp_gate) == 0 for b in mod.xattn.values())


def test_registered_and_recognised_by_suffix():
    t = builtin_types()["video"]
    assert t is VIDEO and t.kind == "xattn" and ".mp4" in t.suffixes and "moving-shapes" in t.sources
    assert not set(t.suffixes) & set(builtin_types()["image"].suffixes)


def test_trainable_set_is_aggregator_and_video_blocks():
    from mm.trainable import set_trainable

    model = tiny_video_mm(tiny_llm(layers=4))
    names = set_trainable(model, ["video.encoder.aggregator", "video.xattn"])
    assert names and all(n.startswith(("video.encoder.aggregator.", "video.xattn.")) for n in names)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"modalities." + n for n in names}  # LLM, image path, image copy frozen


# -- text invariance and masks ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_text_only_bit_exact_with_image_and_video_attached(family):
    llm = tiny_llm(family)
    ids = torch.randint(1, 128, (2, 12))
    ref = llm(ids).logits
    model = tiny_video_mm(llm)
    assert torch.equal(model(ids, media={"video": video_media(2)}), ref)  # zero gates
    open_gates(model)  # open gates, no media: the adapters do nothing
    assert torch.equal(model(ids), ref)
    assert not torch.allclose(model(ids, media={"video": video_media(2)}), ref)


def test_text_before_the_video_is_untouched():
    llm = tiny_llm()
    model = tiny_video_mm(llm)
    open_gates(model)
    ids = torch.randint(1, 128, (1, 16))
    ref = llm(ids).logits
    out = model(ids, media={"video": video_media(1, positions=torch.tensor([[6]]))})
    assert torch.equal(out[:, :6], ref[:, :6])
    assert not torch.allclose(out[:, 6:], ref[:, 6:])


def test_video_and_image_together():
    llm = tiny_llm()
    model = tiny_video_mm(llm)
    open_gates(model)
    ids = torch.randint(1, 128, (1, 16))
    img = image_media(1, positions=torch.tensor([[4]]))
    vid = video_media(1, positions=torch.tensor([[9]]))
    both = model(ids, media={"image": img, "video": vid})
    only_image = model(ids, media={"image": img})
    assert torch.equal(both[:, :9], only_image[:, :9])  # the video acts from its marker on
    assert not torch.allclose(both[:, 9:], only_image[:, 9:])


def test_padded_frames_and_empty_groups_are_masked():
    model = tiny_video_mm(tiny_llm()).eval()
    short = video_media(1, frames=3)  # F=8, K=4: group 2 has no frame
    feats, mask = model.modalities["video"].encode(short.inputs)
    assert feats.shape == (1, 2 * 4, 32) and mask.tolist() == [[True] * 4 + [False] * 4]
    cross, _ = model.encode_media({"video": short}, 1)
    assert cross["video"].valid.tolist() == mask.tolist()
    other = video_media(1, frames=3)
    other.inputs["frames"][0, 3:] = 255  # content of padding frames must not matter
    ids = torch.randint(1, 128, (1, 10))
    open_gates(model)
    assert torch.equal(model(ids, media={"video": short}), model(ids, media={"video": other}))


# -- preprocessing ---------------------------------------------------------------------------
def test_preprocess_samples_uniformly_and_pads_to_max_frames(tmp_path):
    mod = build_video(LLMShape(64, 8, 4, 2), encoder=ENCODER, max_frames=F, adapter=dict(layers=[1]))
    p = clip_file(tmp_path / "a.mp4", 16)
    item = preprocess(read(p), mod, max_frames=4)  # 16 frames -> centres of 4 segments
    want = load_video(p, max_frames=4)
    assert item["frames"].shape == (4, 1, 3, S, S) and item["frames"].dtype == torch.uint8
    assert torch.equal(item["frames"][:, 0], want)
    assert [round(int(x) / 15) for x in item["frames"][:, 0, 0, 0, 0]] == [2, 6, 10, 14]
    short = preprocess(read(clip_file(tmp_path / "b.mp4", 5)), mod)  # fewer than F frames
    assert short["frames"].shape == (F, 1, 3, S, S) and short["frame_mask"].tolist() == [True] * 5 + [False] * 3
    one = preprocess(read(p), mod, single_frame=True)
    assert one["frame_mask"].nonzero().flatten().tolist() == [4]  # the middle of 8 sampled frames
    assert int(one["frames"][~one["frame_mask"]].max()) == 0


def test_preprocess_keeps_aspect_and_tiles_like_images(tmp_path):
    x = np.full((2, 64, 128, 3), 200, np.uint8)  # 2:1
    write_mp4(tmp_path / "wide.mp4", x, 8, qp=0)
    one = build_video(LLMShape(64, 8, 4, 2), encoder=ENCODER, max_frames=2, adapter=dict(layers=[1]))
    item = preprocess(read(tmp_path / "wide.mp4"), one)  # one tile: 16 x 32 inside 32 x 32
    rows = item["frames"][0, 0, 0].float().mean(1)  # (S,)
    assert rows[:16].min() > 150 and rows[16:].max() == 0  # bottom padded with black
    four = build_video(LLMShape(64, 8, 4, 2), encoder=dict(ENCODER, max_tiles=4), max_frames=2, adapter=dict(layers=[1]))
    item = preprocess(read(tmp_path / "wide.mp4"), four)  # the image path's grid: 2 x 1 tiles of 32
    assert item["frames"].shape == (2, 4, 3, S, S) and item["tile_mask"].tolist() == [True, True, False, False]
    assert int(item["aspect"]) == possible_grids(4).index((2, 1))
    assert item["frames"][:, :2].float().mean() > 150 and int(item["frames"][:, 2:].max()) == 0
    feats, mask = four.encode({k: v[None] for k, v in item.items()})
    assert feats.shape[0] == 1 and mask.all()


# -- bad inputs -------------------------------------------------------------------------------
def bad_files(tmp_path) -> dict[str, Path]:
    import av

    good = clip_file(tmp_path / "good.mp4", 12)
    out = {"missing": tmp_path / "missing.mp4"}
    (tmp_path / "empty.mp4").write_bytes(b"")
    out["empty"] = tmp_path / "empty.mp4"
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x01not a video" * 200)
    out["corrupt"] = tmp_path / "garbage.mp4"
    data = good.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 3])
    out["truncated"] = tmp_path / "truncated.mp4"
    with av.open(str(tmp_path / "audio.m4a"), "w", format="mp4") as c:  # audio-only
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for _ in range(8):
            for pkt in s.encode(frame):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    (tmp_path / "audio.mp4").write_bytes((tmp_path / "audio.m4a").read_bytes())
    out["audio"] = tmp_path / "audio.mp4"
    with av.open(str(tmp_path / "zero.mp4"), "w", format="mp4") as c:  # a video stream, no frame
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = S, S, "yuv420p"
    out["zero"] = tmp_path / "zero.mp4"
    return out


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    mod = build_video(LLMShape(64, 8, 4, 2), encoder=ENCODER, max_frames=4, adapter=dict(layers=[1]))
    for kind, path in bad_files(tmp_path).items():
        with pytest.raises(ValueError) as e:
            preprocess(read(path), mod)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg, (kind, msg)


def test_cli_caption_bad_video_is_one_line(tmp_path, capsys, video_run):
    from mm.cli import main

    bad = bad_files(tmp_path)
    for kind in ("truncated", "audio"):
        assert main(["caption", "--model", str(video_run), str(bad[kind])]) == 2
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.startswith("mm:") or "Traceback" in l]
        assert len(lines) == 1 and lines[0].startswith("mm: error:") and str(bad[kind]) in lines[0], err
    assert main(["caption", "--model", str(video_run), str(clip_file(tmp_path / "ok.mp4", 8))]) == 0
    assert capsys.readouterr().out.startswith(str(tmp_path / "ok.mp4"))
    assert main(["ask", "--model", str(video_run), "--video", str(tmp_path / "ok.mp4"), "which way?"]) == 0


# -- a short video_adapter stage ----------------------------------------------------------------
@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tiny_llm_dir):
    """A two-step image run on a tiny LLM (the video stage starts from it)."""
    from PIL import Image

    from mm.config import load_config
    from mm.train import train

    d = tmp_path_factory.mktemp("image")
    rows = []
    for i, (name, rgb) in enumerate([("red", (255, 0, 0)), ("blue", (0, 0, 255))] * 2):
        Image.new("RGB", (S, S), rgb).save(d / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "text": f"a {name} square"}))
    (d / "m.jsonl").write_text("\n".join(rows) + "\n")
    cfg = load_config(CONFIGS / "demo" / "image_adapter_pretrain.yaml", [
        f"out={d / 'run'}", f"model.llm={tiny_llm_dir}", "init_from=null",
        f"data.sources=[{{type: manifest, path: {d / 'm.jsonl'}}}]", "optim.steps=2", "optim.batch_size=2",
        "optim.warmup_steps=1", "model.modalities.image.adapter={every: 2}", "checkpoint_every=100"])
    return train(cfg, progress=False)


def _video_cfg(out, tiny_llm_dir, image_run, data, extra=()):
    from mm.config import load_config

    cfg = load_config(CONFIGS / "demo" / "video_adapter.yaml", [
        f"out={out}", f"model.llm={tiny_llm_dir}", f"init_from={image_run}",
        "model.modalities.image.adapter={every: 2}",
        "model.modalities.video.adapter={image_layers: {every: 2}, every_image: 2}",
        "model.modalities.video.max_frames=8", "model.modalities.video.aggregator.frames_per_group=4",
        "data.preprocess.video.max_frames=8", "optim.steps=3", "optim.batch_size=3", "optim.warmup_steps=1",
        "checkpoint_every=100", "log_every=1", "init_copy={video.encoder.image_encoder.image: image.encoder}",
        *extra])
    cfg.data.sources = [{"type": "manifest", "path": str(data)}]
    return cfg


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    """Six tiny moving-shapes clips in a manifest, plus one corrupt and one missing entry."""
    d = tmp_path_factory.mktemp("clips")
    make_dataset(d, n=6, seed=0, num_frames=8, size=S)
    m = d / "train.jsonl"
    (d / "bad.mp4").write_bytes(b"junk" * 100)
    with open(m, "a") as f:
        f.write(json.dumps({"video": "bad.mp4", "text": "a red circle moves up"}) + "\n")
        f.write(json.dumps({"video": "gone.mp4", "text": "a red circle moves up"}) + "\n")
    return m


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, tiny_llm_dir, image_run, video_data):
    from mm.train import train

    out = tmp_path_factory.mktemp("video") / "run"
    return train(_video_cfg(out, tiny_llm_dir, image_run, video_data, extra=["data.max_bad_fraction=0.5"]),
                 progress=False)


def test_video_stage_trains_only_video_parts_and_skips_bad_clips(image_run, video_run):
    from mm.checkpoint import load_tensors
    from mm.runs import load_run

    img, _ = load_tensors(image_run / "model" / "modalities.safetensors")
    vid, _ = load_tensors(video_run / "model" / "modalities.safetensors")
    for k, v in img.items():  # the image path is untouched
        assert torch.equal(vid[k], v), k
    for k, v in img.items():  # the video path's image encoder is the image run's, frozen
        if k.startswith("image.encoder."):
            assert torch.equal(vid["video.encoder.image_encoder.image." + k[len("image.encoder."):]], v), k
    assert any(float(vid[k].abs()) > 0 for k in vid if k.startswith("video.xattn.") and k.endswith("_gate"))
    summary = json.loads((video_run / "summary.json").read_text())
    assert summary["text_weights_unchanged"] and summary["bad_samples"] > 0  # skipped and counted
    assert all("\n" not in e for e in summary["bad_examples"])
    model, llm, types, cfg = load_run(video_run)
    assert set(model.modalities) == {"image", "video"}


@pytest.mark.parametrize("form", ["layers", "wildcard"])
def test_init_from_image_adapter(tmp_path, tiny_llm_dir, image_run, video_data, form):
    from mm.checkpoint import load_tensors
    from mm.runs import build_model, load_weights

    image = image_run
    cfg = _video_cfg(tmp_path / "v2", tiny_llm_dir, image, video_data)
    layers = [int(i) for i in build_model(cfg.model)[0].modalities["video"].xattn]
    if form == "layers":
        cfg.init_copy = {**cfg.init_copy, **image_adapter_copy(layers)}
    else:  # as configs/demo/video_adapter.yaml says it, without naming the LLM's layers
        from mm.modalities.video import XATTN_PARTS

        cfg.init_copy = {**cfg.init_copy, **{f"video.xattn.*.{x}": f"image.xattn.*.{x}" for x in XATTN_PARTS}}
    model, _, _ = build_model(cfg.model)
    load_weights(model, image, strict=False, copy=cfg.init_copy)
    img, _ = load_tensors(image / "model" / "modalities.safetensors")
    sd = model.modalities.state_dict()
    for i in layers:
        for k, v in img.items():
            if k.startswith(f"image.xattn.{i}."):
                got = sd["video" + k[len("image"):]]
                if k.endswith("_gate"):
                    assert float(got) == 0  # gates stay closed: still the text model at step 0
                else:
                    assert torch.equal(got, v), k


def test_init_copy_wildcard_errors(tmp_path, tiny_llm_dir, image_run, video_data):
    from mm.checkpoint import CheckpointError
    from mm.runs import build_model, load_weights

    model, _, _ = build_model(_video_cfg(tmp_path / "v3", tiny_llm_dir, image_run, video_data).model)
    with pytest.raises(CheckpointError, match="has no tensors for a 'video.xattn.\\*.nope'"):
        load_weights(model, image_run, strict=False, copy={"video.xattn.*.nope": "image.xattn.*.nope"})
    with pytest.raises(CheckpointError, match="must appear once in each"):
        load_weights(model, image_run, strict=False, copy={"video.xattn.*.mlp": "image.xattn.15.mlp"})

def test_llama3_scale_configs_instantiate():
    from mm.config import load_config
    from mm.modalities.video import build as build_v

    import transformers

    files = sorted((CONFIGS / "video").glob("*.yaml"))
    assert files
    for f in files:
        assert f.read_text().startswith("# mm train configs/video/")
        cfg = load_config(f)
        shape = llm_shape(transformers.AutoConfig.for_model(**cfg.extra["llm_config"]))  # Llama 3 8B
        assert "video.xattn" in cfg.trainable
        with torch.device("meta"):
            mods = {n: {"image": build_image, "video": build_v}[n](shape, **{k: v for k, v in s.items() if k != "type"})
                    for n, s in cfg.model.modalities.items()}
        assert mods["video"].layer_indices == [15, 31]
        assert mods["video"].encoder.aggregator.frames_per_group in (16, 32)


def test_models_sharing_one_llm_use_their_own_adapters():
    """Stages of one process share the cached LLM: an earlier model's hooks must stay inert."""
    llm = tiny_llm()
    ids = torch.randint(1, 128, (2, 12))
    first = tiny_video_mm(llm, seed=1)
    open_gates(first)
    first(ids, media={"video": video_media(2)})
    second = tiny_video_mm(llm, seed=5)
    open_gates(second)
    alone = tiny_video_mm(tiny_llm(), seed=5)
    open_gates(alone)
    media = {"video": video_media(2), "image": image_media(2)}
    assert torch.equal(second(ids, media=media), alone(ids, media=media))


def test_space_time_pool_tokens_follow_frames_and_masks():
    from encoders.video import video_aggregator
    from mm.modalities.video import SpaceTimeResampler

    torch.manual_seed(0)
    agg = SpaceTimeResampler(video_aggregator(dim=16, num_latents=3, frames_per_group=4, depth=1, num_heads=2),
                             tokens_per_frame=5, dim=16, pool_tokens=2)
    x = torch.randn(2, 6, 5, 16)  # 6 frames -> 2 groups of 4 (the second padded)
    fm = torch.ones(2, 6, dtype=torch.bool)
    fm[1, 4:] = False  # row 1: the second group has no valid frame
    tokens, mask = agg(x, fm)
    assert tokens.shape == (2, 2 * (3 + 2), 16) and mask.shape == (2, 10)
    assert mask[0].all() and mask[1, :5].all() and not mask[1, 5:].any()
    assert torch.equal(tokens[1, 5:], torch.zeros(5, 16))
    pooled = lambda t: t.view(2, 2, 5, 16)[:, :, 3:]  # noqa: E731 - the P pooled tokens of each group
    y = x.clone()
    y[1, 4:] = 100.0  # what a masked frame holds changes nothing
    assert torch.equal(pooled(agg(y, fm)[0]), pooled(tokens))
    one = x[:1, :4]  # one full group; the same frames in the other order pool differently
    assert not torch.allclose(agg(one)[0][0, 3:], agg(one.flip(1))[0][0, 3:], atol=1e-3)
    # at pool_tokens=0 it is the plain resampler's output, as before
    plain = SpaceTimeResampler(agg.resampler, tokens_per_frame=5, dim=16)
    plain.token_pos = agg.token_pos
    assert torch.equal(plain(x, fm)[0], tokens.view(2, 2, 5, 16)[:, :, :3].reshape(2, 6, 16))


def test_centred_pool_tokens_see_change_not_content():
    """``pool_center``: each token position minus its mean over the group's valid frames before
    the (frame, position) pooling, so a still clip pools to the same tokens whatever it shows,
    and masked frames neither count in the mean nor change anything."""
    from encoders.video import video_aggregator
    from mm.modalities.video import SpaceTimeResampler

    torch.manual_seed(0)
    agg = SpaceTimeResampler(video_aggregator(dim=16, num_latents=3, frames_per_group=4, depth=1, num_heads=2),
                             tokens_per_frame=5, dim=16, pool_tokens=2, pool_center=True)
    pooled = lambda t: t.view(t.shape[0], -1, 5, 16)[:, :, 3:]  # noqa: E731
    still_a = torch.randn(1, 1, 5, 16).expand(1, 4, 5, 16)
    still_b = torch.randn(1, 1, 5, 16).expand(1, 4, 5, 16)
    torch.testing.assert_close(pooled(agg(still_a)[0]), pooled(agg(still_b)[0]))
    moving = torch.randn(1, 4, 5, 16)
    assert not torch.allclose(pooled(agg(moving)[0]), pooled(agg(still_a)[0]), atol=1e-3)
    fm = torch.tensor([[True, True, True, False]])
    y = moving.clone()
    y[0, 3] = 100.0
    torch.testing.assert_close(pooled(agg(y, fm)[0]), pooled(agg(moving, fm)[0]))
