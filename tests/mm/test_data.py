import json

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.image_io import ImageError, load_image
from mm.data import BadSample, DataError, read_manifest


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_image_modes_become_rgb(tmp_path, mode):
    arr = (np.arange(32 * 32) % 256).reshape(32, 32).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 257)
    elif mode == "P":
        img = Image.fromarray(arr).convert("P")
    else:
        img = Image.fromarray(arr).convert(mode)
    p = tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg"
    img.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (32, 32)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    img = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    img.save(tmp_path / "w.png")
    assert np.asarray(load_image(tmp_path / "w.png")).min() == 255


@pytest.mark.parametrize("content,problem", [
    (None, "no such file"), (b"", "empty file"), (b"hello, not an image", "not a readable image")])
def test_bad_images_one_line_errors(tmp_path, content, problem):
    p = tmp_path / "bad.png"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ImageError) as e:
        load_image(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and problem in msg


def test_truncated_image(tmp_path):
    p = tmp_path / "t.png"
    Image.fromarray(np.random.randint(0, 255, (64, 64, 3), np.uint8)).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(p)


def test_manifest_bad_lines_become_errors(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "a.png", "text": "x"}\nnot json\n[1, 2]\n\n')
    recs = read_manifest(m)
    assert recs[0]["_base"] == str(tmp_path)
    assert "m.jsonl:2" in recs[1]["_error"] and "m.jsonl:3" in recs[2]["_error"]
    with pytest.raises(DataError, match="no such manifest"):
        read_manifest(tmp_path / "missing.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_manifest(tmp_path / "latin.jsonl")


def test_tiles_keep_aspect_ratio():
    from encoders.image_io import best_grid, tile_image
    assert best_grid(64, 64, 32, 4) == (2, 2)
    assert best_grid(128, 32, 32, 4) == (4, 1)
    assert best_grid(16, 16, 32, 4) == (1, 1)
    tiles, mask, aspect = tile_image(Image.new("RGB", (100, 40)), tile_size=32, max_tiles=4)
    assert tiles.shape == (4, 3, 32, 32) and mask.tolist() == [True, True, True, False]


def test_sample_stream_cache_prepares_each_record_once_with_the_same_batches():
    from mm.data import BadSample, SampleStream

    recs = [{"i": i} for i in range(6)] + [{"i": -1}]
    calls = []

    def make(rec):
        calls.append(rec["i"])
        if rec["i"] < 0:
            raise BadSample("bad record")
        return rec["i"] * 10

    def batches(cache_items):
        calls.clear()
        s = SampleStream([(recs, 1.0), (recs[:2], 1.0)], make=make, seed=5, max_bad_fraction=0.9,
                         cache_items=cache_items)
        return [s.batch(k, 4) for k in range(20)], list(calls), s.bad

    plain, plain_calls, plain_bad = batches(0)
    cached, cached_calls, cached_bad = batches(100)
    assert cached == plain and cached_bad == plain_bad > 0  # bad records are never cached, still counted
    # cached by (source, record): records 0 and 1 are in both sources, the others in one
    assert all(cached_calls.count(i) <= (2 if i < 2 else 1) for i in range(6))
    assert len(cached_calls) < len(plain_calls)


def test_balanced_source_draws_each_question_answer_pair_equally():
    from collections import Counter

    from mm.data import SampleStream

    # "no" is the common answer 9 times out of 10, as for easy-vqa's "is there a <color> shape?"
    recs = [{"question": "is it red?", "text": "no" if i % 10 else "yes"} for i in range(1000)]
    recs += [{"question": "what shape?", "text": "circle"}] * 500

    def answers(balance):
        s = SampleStream([(recs, 1.0, balance)], make=lambda r: (r["question"], r["text"]), seed=3,
                         max_bad_fraction=0.1)
        return Counter(x for k in range(200) for x in s.batch(k, 16))

    plain, balanced = answers(None), answers(["question", "text"])
    n = 200 * 16
    assert plain[("is it red?", "yes")] < 0.1 * n and plain[("what shape?", "circle")] > 0.25 * n
    for pair in [("is it red?", "yes"), ("is it red?", "no"), ("what shape?", "circle")]:
        assert abs(balanced[pair] / n - 1 / 3) < 0.04  # three pairs, a third of the draws each
    again = SampleStream([(recs, 1.0, ["question", "text"])], make=lambda r: (r["question"], r["text"]), seed=3,
                         max_bad_fraction=0.1)
    assert [again.batch(k, 16) for k in range(5)] == [
        SampleStream([(recs, 1.0, ["question", "text"])], make=lambda r: (r["question"], r["text"]), seed=3,
                     max_bad_fraction=0.1).batch(k, 16) for k in range(5)]  # deterministic per step


def test_source_media_before_the_question_and_answer_filter():
    from mm.data import load_source
    from mm.prompts import mark
    from mm.runs import modality_types
    from mm.config import ModelConfig

    types = modality_types(ModelConfig(llm="smollm2", modalities={"image": {}}))
    src = {"type": "easy-vqa", "split": "val", "task": "vqa", "answers": ["yes", "no"], "limit": 40}
    after = load_source(src, types)
    before = load_source({**src, "media": "before"}, types)
    assert after and {r["text"] for r in after} == {"yes", "no"}
    assert [r["question"] for r in before] == [mark("image") + r["question"] for r in after]
    assert "<|mm:" not in after[0]["question"]
    with pytest.raises(DataError, match="media must be before or after"):
        load_source({**src, "media": "middle"}, types)
    # written in a config, a bare [yes, no] is text (YAML 1.1 would make it booleans), the same filter
    from mm.config import load_config
    cfg = load_config(None, ["data.sources=[{type: easy-vqa, split: val, task: vqa, answers: [yes, no], limit: 40}]"])
    assert cfg.data.sources[0]["answers"] == ["yes", "no"]
    assert load_source(cfg.data.sources[0], types) == after
    with pytest.raises(ValueError, match=r"easy-vqa val vqa: answers \['purple'\] keep no record"):
        load_source({**src, "answers": ["purple"]}, types)


def test_easy_vqa_fit_and_val_split_train_by_image():
    from mm.sources.easy_vqa import records

    fit, val, train = (records(s, task="vqa") for s in ("fit", "val", "train"))
    fit_img, val_img = {r["image"] for r in fit}, {r["image"] for r in val}
    assert not fit_img & val_img
    assert fit_img | val_img == {r["image"] for r in train} and len(fit) + len(val) == len(train)
    assert 0.08 < len(val_img) / len(fit_img | val_img) < 0.12
    with pytest.raises(ValueError, match="split must be one of"):
        records("dev")


def test_placement_before_answer_sees_media_from_the_last_prompt_token(smollm2_dir, tmp_path):
    """``placement: before_answer``: same tokens as the plain prompt, the image at the token
    that predicts the answer's first token; a marker in the question still wins; the model
    carries the placement, so training samples and inference prompts agree. ``before_question``
    is the prompt with the marker written in front of the question."""
    from transformers import AutoTokenizer

    from mm.data import make_sample
    from mm.modalities.image import IMAGE
    from mm.modality import Modality
    from mm.model import MultimodalLM
    from mm.modalities.base import llm_shape
    from mm.modalities.image import build as build_image
    from mm.prompts import encode, mark
    from tests.helpers import tiny_llm

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    llm = tiny_llm()

    def model(placement):
        mod = build_image(llm_shape(llm.config), encoder=dict(preset="tiny", out_dim=32),
                          adapter=dict(every=2, placement=placement))
        return MultimodalLM(llm, {"image": mod})

    rec = {"image": str(tmp_path / "a.png"), "question": "is there a red shape?", "text": "yes"}
    kw = dict(types={"image": IMAGE}, tokenizer=tok, preprocess={})
    late, plain = (make_sample(rec, model=model(p), **kw) for p in ("before_answer", "after_question"))
    prompt = encode(tok, "is there a red shape?").ids
    first_label = next(i for i, l in enumerate(late.labels) if l != -100)
    assert late.ids == prompt + late.ids[len(prompt):] and late.labels == plain.labels
    assert late.media["image"][0][1] == len(prompt) - 1 == first_label - 1
    assert tok.decode(late.ids[late.media["image"][0][1]]) == "\n"  # the assistant header's last token
    assert plain.media["image"][0][1] < len(prompt) - 4  # inside the user turn
    marked = make_sample({**rec, "question": mark("image") + rec["question"]}, model=model("before_answer"), **kw)
    assert marked.media["image"][0][1] < plain.media["image"][0][1]  # the marker's place: before the question
    first = make_sample(rec, model=model("before_question"), **kw)  # that place as the modality's own
    assert (first.ids, first.labels, first.media["image"][0][1]) == (marked.ids, marked.labels, marked.media["image"][0][1])
    assert tok.decode(first.ids[first.media["image"][0][1]:]).startswith("is there a red shape?")
    with pytest.raises(ValueError, match="placement must be one of"):
        model("middle")
    with pytest.raises(ValueError, match="placement must be one of"):
        Modality(kind="tokens", encoder=torch.nn.Identity(), adapter=torch.nn.Identity(), llm_dim=8,
                 placement="before_answer")
