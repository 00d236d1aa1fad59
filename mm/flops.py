"""Useful FLOPs of one adapter-training step with a frozen LLM (for MFU).

The counting rules are those of ``PERFORMANCE.md`` ("Counting FLOPs with a frozen LLM").
Per text token, with N = a layer's parameter count, T = text length, d = attention width:

- frozen LLM layer below the lowest adapter: forward only, ``2N + 4Td``;
- frozen LLM layer at or above an adapter: forward + activation gradients, ``4N + 12Td``;
- trainable layer: ``6N + 12Td``;
- cross-attention block: ``6 * (q, o, MLP params) + 12 * N_media * d`` per text token, plus
  ``6 * (k, v params) * N_media`` per sample;
- frozen LM head: ``4 * d * V`` per token;
- image encoder, per image token p of an image (w = encoder width, P = tokens per image):
  trainable ``6N + 12Pw`` per layer, frozen ``2N + 4Pw`` (0 if its features are cached);
  patch embedding and projector count as linear layers (6 or 2 times their params).

MFU = useful FLOPs per step / (step time * peak FLOP/s). Recomputation does not count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Dense bf16 peak of one H100 SXM (datasheet); the H200 has the same compute.
H100_BF16_PEAK = 989.4e12


@dataclass
class EncoderCount:
    """What the FLOP count needs to know of an image encoder.

    Attributes:
        layer_params: parameter count of each per-tile transformer layer.
        global_layer_params: parameter count of each layer that runs over all tiles at once.
        width: encoder width w.
        tokens_per_tile: tokens per tile (patches + class token).
        tiles: tiles per image.
        patch_params: parameters of the patch embedding (applied once per patch).
        projector_params: parameters of the output projection (and its norm).
    """

    layer_params: list[int]
    global_layer_params: list[int]
    width: int
    tokens_per_tile: int
    tiles: int = 1
    patch_params: int = 0
    projector_params: int = 0


@dataclass
class LLMCount:
    """What the FLOP count needs to know of the frozen LLM and its adapters.

    Attributes:
        layer_params: parameter count of each decoder layer.
        attn_width: attention width d (heads x head width).
        hidden: LLM hidden width (for the LM head).
        vocab: vocabulary size V.
        adapters: decoder layer index -> (q + o + MLP params, k + v params) of the
            cross-attention block that runs before that layer.
        adapter_attn_width: attention width of the cross-attention blocks.
    """

    layer_params: list[int]
    attn_width: int
    hidden: int
    vocab: int
    adapters: dict[int, tuple[int, int]] = field(default_factory=dict)
    adapter_attn_width: int | None = None


def train_step_flops(llm: LLMCount, *, batch: int, text_len: int, media_tokens: int,
                     encoder: EncoderCount | None = None, encoder_trainable: bool = False,
                     projector_trainable: bool = True, features_cached: bool = False) -> dict[str, float]:
    """Useful FLOPs of one training step, by part. ``media_tokens``: cross-attention keys per
    sample. Returns a dict of parts and their ``total``."""
    T, d = text_len, llm.attn_width
    tokens = batch * text_len
    low = min(llm.adapters) if llm.adapters else len(llm.layer_params)
    below = sum(2 * n + 4 * T * d for n in llm.layer_params[:low])
    above = sum(4 * n + 12 * T * d for n in llm.layer_params[low:])
    dx = llm.adapter_attn_width or d
    xattn_tok = sum(6 * qo + 12 * media_tokens * dx for qo, _ in llm.adapters.values())
    xattn_kv = sum(6 * kv * media_tokens for _, kv in llm.adapters.values())
    out = {
        "llm_below_adapters": below * tokens,
        "llm_above_adapters": above * tokens,
        "cross_attention": xattn_tok * tokens + xattn_kv * batch,
        "lm_head": 4 * llm.hidden * llm.vocab * tokens,
        "encoder": 0.0,
        "projector": 0.0,
    }
    if encoder is not None:
        per_tile = encoder.tokens_per_tile
        per_image = per_tile * encoder.tiles
        mul, att = (6, 12) if encoder_trainable else (2, 4)
        if not (features_cached and not encoder_trainable):
            enc = sum(mul * n + att * per_tile * encoder.width for n in encoder.layer_params) * per_image
            enc += sum(mul * n + att * per_image * encoder.width for n in encoder.global_layer_params) * per_image
            enc += mul * encoder.patch_params * (per_tile - 1) * encoder.tiles
            out["encoder"] = float(enc * batch)
        pmul = 6 if (projector_trainable or encoder_trainable) else 2
        out["projector"] = float(pmul * encoder.projector_params * per_image * batch)
    out = {k: float(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_model(model, modality: str = "image") -> tuple[LLMCount, EncoderCount | None]:
    """Read the counts off a :class:`mm.model.MultimodalLM` (open_clip ImageEncoder)."""
    cfg = model.llm.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    mod = model.modalities[modality]
    adapters, dx = {}, None
    for i, blk in mod.xattn.items():
        qo = _numel(blk.q_proj) + _numel(blk.o_proj) + _numel(blk.mlp)
        kv = _numel(blk.k_proj) + _numel(blk.v_proj)
        adapters[int(i)] = (qo, kv)
        dx = blk.n_heads * blk.head_dim
    llm = LLMCount(layer_params=[_numel(layer) for layer in model.layers], attn_width=heads * head_dim,
                   hidden=cfg.hidden_size, vocab=cfg.vocab_size, adapters=adapters, adapter_attn_width=dx)
    enc = getattr(mod, "encoder", None)
    if enc is None or not hasattr(enc, "vit"):
        return llm, None
    vit = enc.vit
    grid = vit.grid_size if hasattr(vit, "grid_size") else None
    n_patches = grid[0] * grid[1] if grid else (enc.tile_size // vit.patch_size[0]) ** 2
    ec = EncoderCount(layer_params=[_numel(b) for b in vit.transformer.resblocks],
                      global_layer_params=[_numel(b) for b in enc.blocks], width=vit.transformer.width,
                      tokens_per_tile=n_patches + 1, tiles=enc.max_tiles, patch_params=_numel(vit.conv1),
                      projector_params=_numel(enc.norm) + _numel(enc.proj))
    return llm, ec


def mfu(flops: float, seconds: float, peak: float = H100_BF16_PEAK) -> float:
    return flops / (seconds * peak)
