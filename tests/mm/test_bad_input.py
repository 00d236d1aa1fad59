"""Bad input the other test files do not cover (see docs/BAD_INPUT.md for the whole table):
each case ends in one clear message naming the file, line or key, never a traceback or a
silent wrong result."""

import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.image_io import ImageError, load_image, tile_image
from mm.cli import main
from mm.config import ConfigError, load_config
from mm.data import BadSample, DataError, SampleStream, load_source, make_sample, read_folder

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo" / "image_adapter_pretrain.yaml"


def _one_line_error(capsys, argv, *needles, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("mm: error:") and "\n" not in err and all(n in err for n in needles), err
    return err


# -- images -------------------------------------------------------------------------------
def _png_header(path: Path, width: int, height: int) -> Path:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def make(tiny_llm_dir):
    """make_sample for a tiny image model with the real tokenizer."""
    from transformers import AutoTokenizer

    from tests.helpers import tiny_image_mm, tiny_llm
    from mm.modalities.image import IMAGE
    model = tiny_image_mm(tiny_llm(layers=2))
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    return lambda rec: make_sample(rec, model=model, types={"image": IMAGE}, tokenizer=tok, preprocess={})


def test_huge_image_is_refused_not_a_traceback(tmp_path, make):
    bomb = _png_header(tmp_path / "bomb.png", 100_000, 100_000)  # 10 gigapixels claimed by a 50-byte file
    with pytest.raises(ImageError, match=r"bomb.png: image too large"):
        load_image(bomb)
    with pytest.raises(BadSample, match="bomb.png: image too large"):
        make({"image": str(bomb), "text": "x"})


def test_image_path_is_a_folder(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match="dir.png: corrupt or truncated image"):
        load_image(tmp_path / "dir.png")


def test_tiny_and_extreme_aspect_images_fit_the_tiles():
    tiles, mask, _ = tile_image(Image.new("RGB", (1, 1)), tile_size=32, max_tiles=4)
    assert tiles.shape == (4, 3, 32, 32) and mask.tolist() == [True, False, False, False]
    tiles, mask, _ = tile_image(Image.new("RGB", (4000, 10)), tile_size=32, max_tiles=4)
    assert tiles.shape == (4, 3, 32, 32) and mask.all() and torch.isfinite(tiles).all()


# -- manifest records -----------------------------------------------------------------------
RECORDS = {  # line -> problem named in the message
    '{"image": "a.png"}': "missing or empty 'text'",
    '{"image": "a.png", "text": "   "}': "missing or empty 'text'",
    '{"image": "a.png", "text": 42}': "missing or empty 'text'",
    '{"imgae": "a.png", "text": "x"}': "no media field (expected one of ['image'])",  # misspelt key
    '{"text": "x"}': "no media field",
    '{"image": "a.png", "text": "x", "question": ["q"]}': "'question' must be text",
    '{"image": "a.png", "text": "x", "question": "<|mm:image|><|mm:image|>"}': "prompt marks a image that the record does not have",
    '{"image": "a.png", "text": "caf\\udce9"}': "'text' is not valid Unicode text",
    '{"image": "missing.png", "text": "x"}': "missing.png: no such file",
    '{"image": "notes.txt", "text": "x"}': "notes.txt: not a readable image",
}


def test_bad_records_are_skipped_with_their_line(tmp_path, make):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("hello")
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(RECORDS) + "\n")
    from mm.data import read_manifest
    for n, (rec, problem) in enumerate(zip(read_manifest(m), RECORDS.values()), 1):
        with pytest.raises(BadSample) as e:
            make(rec)
        msg = str(e.value)
        assert problem in msg and "\n" not in msg, msg
        assert f"m.jsonl:{n}" in msg or str(tmp_path) in msg, msg  # names the line or the file
    make(read_manifest(m)[0] | {"text": "fine"})  # the same record with a text is good


def test_data_source_errors(tmp_path):
    with pytest.raises(DataError, match="unknown data source type 'nope'; known: manifest, folder, easy-vqa, shards"):
        load_source({"type": "nope"}, {})
    with pytest.raises(DataError, match="no training records: every data source is empty"):
        SampleStream([([], 1.0)], make=lambda r: r, seed=0, max_bad_fraction=0.1)
    with pytest.raises(DataError, match="no such folder"):
        read_folder(tmp_path / "nope", "image", (".png",))
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 latin-1")  # a non-UTF-8 caption: read, bad bytes replaced
    assert read_folder(tmp_path, "image", (".png",))[0]["text"] == "caf\ufffd latin-1"


# -- audio (the speech modality) -------------------------------------------------------------
def test_audio_window_length_and_shape(tmp_path):
    import soundfile as sf

    from mm.modalities.base import LLMShape
    from mm.modalities.speech import build, preprocess, read, waveform
    sf.write(tmp_path / "long.wav", np.zeros(61 * 16000, np.int16), 16000, subtype="PCM_16")
    clip = read(tmp_path / "long.wav")  # the header only: a long file is refused without decoding it
    with pytest.raises(ValueError, match=r"long.wav: 61.0 s is longer than the 60 s window"):
        waveform(clip)
    with pytest.raises(ValueError, match=r"must be 1-D \(samples,\), got shape \(2, 100\)"):
        waveform(torch.zeros(2, 100))
    mod = build(LLMShape(64, 2, 4, 2))
    sf.write(tmp_path / "blip.wav", np.zeros(160, np.float32), 16000)  # 10 ms
    with pytest.raises(ValueError, match=r"blip.wav: too short \(10 ms; need 25 ms\)"):
        preprocess(read(tmp_path / "blip.wav"), mod)


# -- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,problem", [
    ("- a\n- b\n", "top level must be a mapping"),
    ("optim: 3\n", "optim must be a mapping"),
    (b"stage: caf\xe9\n", "not valid YAML"),
    ("optim: {steps: abc}\n", "optim.steps: expected a whole number, got 'abc'"),
    ("optim: {lr: fast}\n", "optim.lr: expected a number, got 'fast'"),
    ("data: {sources: manifest.jsonl}\n", "data.sources: expected a list"),
    ("checkpoint_every: 2.5\n", "checkpoint_every: expected a whole number"),
    ("optim: {schedule: linear}\n", "optim.schedule: expected one of cosine, constant, got 'linear'"),
    ("compile: yes\n", "compile: expected true or false, got 'yes'"),  # YAML 1.2: only true / false
])
def test_config_errors(tmp_path, text, problem):
    p = tmp_path / "c.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert problem in str(e.value) and "c.yaml" in str(e.value)


def test_config_numbers_written_like_1e_3_are_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("optim: {lr: 1e-3, weight_decay: 0}\n")  # YAML reads 1e-3 as text
    cfg = load_config(tmp_path / "c.yaml", ["optim.gate_lr_mult=3"])
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 0.0 and cfg.optim.gate_lr_mult == 3.0


def test_config_yes_and_no_are_text_true_and_false_booleans(tmp_path):
    (tmp_path / "c.yaml").write_text("compile: true\nextra: {answers: [yes, no, on, off], flag: False}\n")
    cfg = load_config(tmp_path / "c.yaml", ["extra.more=[n, y]"])
    assert cfg.compile is True and cfg.extra == {"answers": ["yes", "no", "on", "off"], "flag": False, "more": ["n", "y"]}


def test_unknown_names_list_the_choices(tiny_llm_dir):
    from mm.config import ModelConfig
    from mm.modalities import get_type
    from mm.objectives import get_objective
    from mm.runs import build_model
    with pytest.raises(KeyError, match="unknown objective 'nope'; choose one of .*lm"):
        get_objective("nope")
    with pytest.raises(KeyError, match="unknown modality 'imag'; built-in: .*image"):
        get_type("imag")
    with pytest.raises(ConfigError, match="model.modalities.image: .*bogus"):
        build_model(ModelConfig(llm=str(tiny_llm_dir), modalities={"image": {"encoder": {"preset": "tiny"}, "bogus": 1}}))


# -- command-line arguments ---------------------------------------------------------------------
def test_cli_argument_errors(tmp_path, capsys):
    for argv, needle in ((["train", str(CONFIG), "--bogus"], "unrecognized arguments: --bogus"),
                         (["caption", "x.png"], "the following arguments are required: --model"),
                         (["data", "pack", "m.jsonl", "--out", "d", "--shard-size", "abc"], "invalid int value: 'abc'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err
    _one_line_error(capsys, ["train", str(CONFIG), "optim.steps=abc"], "optim.steps: expected a whole number")
    _one_line_error(capsys, ["train", str(CONFIG), "optim"], "override 'optim': expected key=value")
    _one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")], "nope.yaml: no such config file")
    _one_line_error(capsys, ["ask", "--input", "image", "what?"], "expected name=FILE")
    _one_line_error(capsys, ["ask", "--image", str(tmp_path / "gone.png"), "what?"], "gone.png: no such file")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    _one_line_error(capsys, ["ask", "--image", str(tmp_path / "a.png"), "what?"], "--model RUN_DIR is needed")
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "text": "x"}\n')
    _one_line_error(capsys, ["data", "pack", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o"),
                             "--shard-size", "0"], "--shard-size must be a positive number")


# -- shards -------------------------------------------------------------------------------------
@pytest.fixture
def shard_dir(tmp_path):
    from mm.shards import pack
    rows = []
    for i in range(6):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": f"t{i}"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pack(tmp_path / "m.jsonl", tmp_path / "shards", shard_size=3)
    return tmp_path / "shards"


def test_bad_shard_files(shard_dir, tmp_path):
    from mm.shards import shard_source
    first = shard_dir / "shard-000000.tar"
    data = first.read_bytes()
    (shard_dir / "index.json").unlink()  # without the index every shard is checked on opening
    first.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="shard-000000.tar: (truncated shard|not a readable tar shard)"):
        shard_source(path=str(shard_dir))
    first.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(DataError, match="shard-000000.tar: not a readable tar shard"):
        shard_source(path=str(shard_dir))
    first.write_bytes(b"")
    with pytest.raises(DataError, match="shard-000000.tar: not a readable tar shard"):
        shard_source(path=str(shard_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: folder holds no .tar shards"):
        shard_source(path=str(tmp_path / "empty"))
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="x.tar.gz: compressed shards cannot be read by seeking"):
        shard_source(path=str(tmp_path / "x.tar.gz"))
    with pytest.raises(DataError, match=r"unknown option\(s\) shuffle \(known: path, shuffle_buffer"):
        load_source({"type": "shards", "path": str(shard_dir), "shuffle": True}, {})
    with pytest.raises(DataError, match="shuffle_buffer must be a whole number >= 0"):
        shard_source(path=str(shard_dir), shuffle_buffer=-1)


def test_bad_samples_inside_a_shard_are_skipped_and_counted(shard_dir, tmp_path, make):
    import io

    from mm.shards import shard_source
    with tarfile.open(tmp_path / "extra.tar", "w") as tf:
        for name, payload in (("a.json", b"{not json"), ("a.image.png", b"png?"), ("b.json", b"\xff\xfe"),
                              ("c.json", b'["a list"]'), ("d.json", b'{"image": "image.png", "text": "x"}'),
                              ("d.image.png", b"\x89PNG\r\n\x1a\ngarbage")):
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
    src = shard_source(path=str(tmp_path / "extra.tar"))  # extracted media live as long as their source
    recs = list(src)
    problems = ["json member is not valid JSON", "json member is not UTF-8 text", "json member is not a JSON object",
                "not a readable image"]
    for rec, problem in zip(recs, problems):
        with pytest.raises(BadSample) as e:
            make(rec)
        assert problem in str(e.value) and "extra.tar" in str(e.value), str(e.value)


# -- runs used to initialise a stage ----------------------------------------------------------------
def test_init_from_a_mismatched_or_unfinished_run(tmp_path):
    from tests.helpers import tiny_image_mm, tiny_llm
    from mm.checkpoint import CheckpointError, save_tensors
    from mm.runs import load_weights, modality_state
    small = tiny_image_mm(tiny_llm(layers=2))
    with pytest.raises(CheckpointError, match="did that run finish"):
        load_weights(small, tmp_path / "run")
    from mm.modalities.base import llm_shape
    from mm.modalities.image import build
    from mm.model import MultimodalLM
    llm = tiny_llm(layers=2)
    other = MultimodalLM(llm, {"image": build(llm_shape(llm.config), encoder=dict(preset="tiny", out_dim=48),
                                              adapter=dict(every=2))})
    save_tensors(tmp_path / "run" / "model" / "modalities.safetensors", modality_state(other))
    with pytest.raises(CheckpointError, match="modalities.safetensors: .* tensors have other shapes"):
        load_weights(small, tmp_path / "run")


def test_every_row_of_the_table_names_an_existing_test():
    import re
    rows = [l for l in (REPO / "docs" / "BAD_INPUT.md").read_text().splitlines() if re.match(r"\| \d+ \|", l)]
    assert len(rows) >= 30
    for row in rows:
        refs = re.findall(r"(tests/[\w/]+\.py)::(\w+)", row.rsplit("|", 2)[-2])
        assert refs, row
        for path, name in refs:
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name} ({row[:40]})"
