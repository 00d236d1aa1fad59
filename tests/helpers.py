"""Tiny random models shared by the tests (no network, no files)."""

from __future__ import annotations

import torch

from mm.llm import freeze
from mm.modalities.image import build as build_image
from mm.modalities.base import llm_shape
from mm.model import MediaInput, MultimodalLM


def tiny_llm(family: str = "llama", *, layers: int = 8, seed: int = 0):
    """A tiny random decoder-only LM of the given family (frozen)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    cfgs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "gemma": lambda: tf.GemmaConfig(**common, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=16, sliding_window=64),
    }
    cfg = cfgs[family]()
    cfg._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    model = tf.AutoModelForCausalLM.from_config(cfg)
    return freeze(model)


def tiny_image_mm(llm, *, every: int = 2, max_tiles: int = 1, seed: int = 1) -> MultimodalLM:
    torch.manual_seed(seed)
    mod = build_image(llm_shape(llm.config), encoder=dict(preset="tiny", out_dim=32, max_tiles=max_tiles),
                      adapter=dict(every=every))
    return MultimodalLM(llm, {"image": mod})


def image_media(b: int, n: int = 1, *, positions=None, tiles: int = 1, seed: int = 2) -> MediaInput:
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(b * n, tiles, 3, 32, 32, generator=g)
    inputs = {"pixels": pix, "tile_mask": torch.ones(b * n, tiles, dtype=torch.bool),
              "aspect": torch.zeros(b * n, dtype=torch.long)}
    pos = positions if positions is not None else torch.zeros(b, n, dtype=torch.long)
    return MediaInput(inputs=inputs, valid=torch.ones(b, n, dtype=torch.bool), positions=pos)


def open_gates(model: MultimodalLM, value: float = 1.0) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate") and p.requires_grad:
                p.fill_(value)
