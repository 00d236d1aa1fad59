"""WebDataset shards: `mm data pack`, the `shards` data source, its order and exact resume."""

import json
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm.cli import main
from mm.data import BadSample, DataError, SampleStream, load_source
from mm.shards import ShardSource, expand_shards, pack, shard_source


def _images(d: Path, n: int, name="m.jsonl", extra=()) -> Path:
    rows = []
    for i in range(n):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(d / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": f"t{i}"})
    m = d / name
    m.write_text("\n".join([json.dumps(r) for r in rows] + list(extra)) + "\n")
    return m


def _clip(path: Path, frames=4, size=16):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(4))
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for t in range(frames):
            plane = np.full((size * 3 // 2, size), 128, np.uint8)
            plane[:size] = 40 + 40 * t
            for p in s.encode(av.VideoFrame.from_ndarray(plane, format="yuv420p")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_pack_round_trip_image_video_audio(tmp_path):
    import soundfile as sf
    from encoders.audio import load_audio
    from encoders.image_io import load_image
    from encoders.video_io import video_info

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (12, 10), (0, 200, 0)).save(data / "a.png")
    Image.new("RGB", (10, 12), (0, 0, 200)).save(data / "b.jpg")
    sf.write(data / "s.wav", (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000)
    _clip(data / "v.mp4")
    rows = [{"image": "a.png", "text": "a green box", "question": "What is it?"},
            {"video": "v.mp4", "text": "it gets brighter", "task": "caption"},
            {"audio": "s.wav", "text": "hum", "task": "asr", "language": "English"},
            {"image": ["a.png", "b.jpg"], "text": "two boxes"}]
    m = data / "m.jsonl"
    m.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    r = pack(m, tmp_path / "shards", shard_size=3)
    assert r.samples == 4 and r.shards == ["shard-000000.tar", "shard-000001.tar"]

    src = shard_source(path=str(tmp_path / "shards"), shuffle_buffer=10)
    assert len(src) == 4
    recs = list(src)
    for rec, row in zip(recs, rows):
        assert set(rec) == set(row) | {"_where"}
        assert all(rec[k] == v for k, v in row.items() if k not in ("image", "video", "audio"))
    assert "shard-000000.tar:00000000" in recs[0]["_where"] and "m.jsonl:1" in recs[0]["_where"]
    assert Path(recs[0]["image"]).read_bytes() == (data / "a.png").read_bytes()
    assert load_image(recs[0]["image"]).size == (12, 10)
    assert video_info(recs[1]["video"]).num_frames == 4
    assert load_audio(recs[2]["audio"]).shape == (8000,)
    assert [load_image(p).size for p in recs[3]["image"]] == [(12, 10), (10, 12)]
    assert "shard-000001.tar" in recs[3]["image"][0]  # an error would name the shard and key

    import webdataset as wds  # the shards are plain WebDataset shards
    got = list(wds.WebDataset(str(tmp_path / "shards" / "shard-{000000..000001}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == ["00000000", "00000001", "00000002", "00000003"]
    assert json.loads(got[2]["json"])["text"] == "hum" and got[2]["audio.wav"] == (data / "s.wav").read_bytes()


def test_pack_cli_missing_files(tmp_path, capsys, monkeypatch):
    m = _images(tmp_path, 5, extra=['{"image": "gone.png", "text": "x"}', '{"image": "sub/lost.jpg", "text": "y"}'])
    monkeypatch.chdir(tmp_path.parent)  # paths resolve against the manifest, not the working folder
    out = tmp_path / "shards"
    assert main(["data", "pack", str(m), "--out", str(out), "--shard-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "gone.png" in err and "lost.jpg" in err and "m.jsonl:6" in err
    assert err.strip().splitlines()[-1].startswith("mm: error:") and "2 media files missing" in err
    assert not out.exists() or not list(out.glob("*.tar"))
    assert main(["data", "pack", str(m), "--out", str(out), "--shard-size", "2", "--skip-missing"]) == 0
    cap = capsys.readouterr()
    assert "packed 5 samples into 3 shards" in cap.out and "gone.png" in cap.err
    index = json.loads((out / "index.json").read_text())
    assert [e["samples"] for e in index["shards"]] == [2, 2, 1] and len(index["skipped"]["missing"]) == 2
    assert main(["data", "pack", str(m), "--out", str(out), "--skip-missing"]) == 2  # never mixes old and new
    assert "already holds shards" in capsys.readouterr().err
    assert main(["data", "pack", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o2")]) == 2
    assert "no such manifest" in capsys.readouterr().err


@pytest.fixture
def shards(tmp_path):
    m = _images(tmp_path, 23)
    pack(m, tmp_path / "shards", shard_size=4)
    return tmp_path / "shards"


def test_order_is_a_function_of_seed_and_position(shards):
    src = shard_source(path=str(shards), shuffle_buffer=5)
    n = len(src)
    assert n == 23
    order = [src.position(p, seed=0) for p in range(3 * n)]
    epochs = [order[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == n for e in epochs)  # each epoch: all, once
    assert epochs[0] != epochs[1] != epochs[2]
    fresh = shard_source(path=str(shards), shuffle_buffer=5)  # a resumed process jumps straight there
    assert [fresh.position(p, seed=0) for p in (40, 41, 7, 68)] == [order[40], order[41], order[7], order[68]]
    assert [src.position(p, seed=1) for p in range(n)] != epochs[0]
    # no buffer: shards in a shuffled order, each read straight through
    seq = [shard_source(path=str(shards), shuffle_buffer=0).position(p, seed=0) for p in range(n)]
    runs = [[m for s, m in seq if s == k] for k in range(6)]
    assert all(r == list(range(len(r))) for r in runs) and seq != sorted(seq)
    # a buffer mixes neighbouring shards
    assert any(a[0] != b[0] for a, b in zip(epochs[0][:4], epochs[0][1:5]))


def test_sample_stream_over_shards_is_exact_and_rank_invariant(shards):
    def make(rec):
        if "_error" in rec:
            raise BadSample(rec["_error"])
        return rec["text"]

    def stream(**src):
        return SampleStream([(shard_source(path=str(shards), **src), 1.0)], make=make, seed=3, max_bad_fraction=0.5)

    a = stream(shuffle_buffer=6)
    batches = [a.batch(k, 5) for k in range(10)]
    first_epoch = [t for b in batches[:4] for t in b] + batches[4][:3]
    assert sorted(first_epoch) == sorted(f"t{i}" for i in range(23))  # without replacement
    b = stream(shuffle_buffer=6)  # resume at step 7 from the step count alone
    assert [b.batch(k, 5) for k in (7, 8, 9)] == batches[7:]
    r0, r1 = stream(shuffle_buffer=6), stream(shuffle_buffer=6)  # two data-parallel ranks
    r0.shard(0, 2)
    r1.shard(1, 2)
    for k in (0, 6):
        both = r0.batch(k, 5), r1.batch(k, 5)
        assert [both[s % 2][s // 2] for s in range(5)] == batches[k]


def test_split_by_rank_reads_disjoint_shards(shards, monkeypatch):
    seen = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        src = shard_source(path=str(shards), split_by_rank=True)
        seen.append({r["text"] for r in src})
        assert [f.name for f in src.files] == [f"shard-{i:06d}.tar" for i in range(rank, 6, 3)]
    assert set.union(*seen) == {f"t{i}" for i in range(23)} and sum(map(len, seen)) == 23
    monkeypatch.setenv("WORLD_SIZE", "7")
    with pytest.raises(DataError, match="6 shards cannot be split over 7 ranks"):
        shard_source(path=str(shards), split_by_rank=True)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DataError, match="not integers"):
        shard_source(path=str(shards), split_by_rank=True)


def test_paths_patterns_and_index(shards):
    assert len(expand_shards(shards / "shard-{000000..000005}.tar")) == 6
    assert len(expand_shards(str(shards / "shard-00000[0-2].tar"))) == 3
    assert len(load_source({"type": "shards", "path": str(shards / "shard-000001.tar"), "weight": 2}, {})) == 4
    with pytest.raises(DataError, match="1 of 7 shard files missing, e.g. .*shard-000006.tar"):
        expand_shards(shards / "shard-{000000..000006}.tar")
    # a stale index.json (shard rewritten with fewer samples) is noticed by size and re-read
    index = json.loads((shards / "index.json").read_text())
    index["shards"][0]["samples"] = 99
    (shards / "index.json").write_text(json.dumps(index))
    assert len(shard_source(path=str(shards))) == 99 + 19
    index["shards"][0]["bytes"] += 1
    (shards / "index.json").write_text(json.dumps(index))
    assert len(shard_source(path=str(shards))) == 23


def test_extracted_media_are_bounded_and_removed(shards):
    src = ShardSource(expand_shards(shards), keep_extracted=3)
    paths = [Path(src[i]["image"]) for i in range(10)]
    assert sum(p.exists() for p in paths) == 3 and all(p.exists() for p in paths[-3:])
    tmp = src._tmp
    src.close()
    assert not tmp.exists()


def test_plain_webdataset_shards_jpg_txt(tmp_path):
    """Shards from elsewhere: media matched to the model's modalities by suffix, txt = text."""
    import io

    from mm.modalities.image import IMAGE
    with tarfile.open(tmp_path / "x.tar", "w") as tf:
        for key, text in (("s/a", "red"), ("s/b", "blue")):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", text.encode())):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    recs = list(shard_source(types={"image": IMAGE}, path=str(tmp_path / "x.tar")))
    assert [r["text"] for r in recs] == ["red", "blue"] and recs[0]["image"].endswith("a.jpg")


def test_stage_trains_on_shards(tmp_path, tiny_llm_dir, image_manifest):
    from mm.config import load_config
    from mm.train import train
    pack(image_manifest, tmp_path / "shards", shard_size=3)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/demo/image_adapter_pretrain.yaml", [
        f"out={tmp_path / 'run'}", f"model.llm={tiny_llm_dir}", "init_from=null", "optim.steps=2",
        "optim.batch_size=2", "optim.warmup_steps=1", "checkpoint_every=100", "threads=1",
        f"data.sources=[{{type: shards, path: {tmp_path / 'shards'}, shuffle_buffer: 4}}]",
        "model.modalities.image.adapter={every: 2}"])
    out = train(cfg, progress=False)
    s = json.loads((out / "summary.json").read_text())
    assert s["bad_samples"] == 0 and s["samples_seen"] == 4
