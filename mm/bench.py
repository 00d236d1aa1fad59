"""``mm bench``: our model against Hugging Face's Mllama at the same shapes, in one process.

The protocol is ``PERFORMANCE.md``'s. Both models are built with random weights at the same
shapes and live side by side; every measured step alternates between them (the side that
goes first alternates too), so machine load hits both alike and the ratios stay fair even on
a busy machine. Reported, for each side and as the ratio peer time / our time:

- adapter training, text tokens/s, with the vision encoder trainable and frozen (median of
  the timed steps; loss, backward, fused AdamW step on the trainable parameters only);
- peak memory of a training step (the side's own weights and optimizer state plus what the
  step allocates; on CPU the resident set is measured the same way);
- MFU by ``PERFORMANCE.md``'s frozen-LLM FLOP counting (:mod:`mm.flops`);
- greedy generation, new tokens/s at two batch sizes, prefill and image encoding included.

Shapes: ``cpu`` (2 cores, fp32, a tiny image encoder of equal size on both sides) and
``1b-xattn`` (Llama-3.2-1B text shapes, ViT-H/14 at one 560 px tile, bf16, one GPU).
Environment knobs: ``MM_BENCH_THREADS`` overrides the CPU thread count (the protocol's is 2);
``MM_BENCH_COMPILE=1`` adds a pass of ours with regional
``torch.compile`` (training rows "ours+compile"); ``MM_BENCH_DEADLINE`` (seconds) skips that
pass when the run is already older than the deadline, and ``MM_BENCH_COMPILE_ENCODERS=0``
leaves the encoders' blocks eager in it; ``MM_BENCH_GENERATE=0`` skips generation;
``MM_BENCH_PROFILE=DIR`` writes a
profiler table of one training step of each side per encoder mode, and of one generation
call per batch size, into DIR.
A part that fails (an out-of-memory error, a kernel missing on this device) is recorded
with its error, the other parts still run, and the command exits with status 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from mm.flops import H100_BF16_PEAK, count_model, train_step_flops


@dataclass
class Shapes:
    name: str
    # text model
    d: int
    layers: int  # self-attention layers
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    xattn: list[int]  # ours: cross-attention before these self-attention layers
    rope_theta: float = 500000.0
    tie_embeddings: bool = True
    # image encoder (open_clip ViT for ours, MllamaVisionModel for the peer)
    image_size: int = 32
    patch: int = 8
    vit_width: int = 96
    vit_layers: int = 4
    vit_head_width: int = 32
    vit_mlp_ratio: float = 2.0
    vit_indices: list[int] = field(default_factory=lambda: [0, 1, 2])
    gated_layers: int = 1
    # protocol
    dtype: str = "float32"
    threads: int | None = None
    train_batch: int = 2
    train_len: int = 128
    warmup: int = 3
    timed: int = 10
    gen_prompt: int = 16
    gen_new: int = 32
    gen_batches: tuple[int, ...] = (1, 4)
    gen_reps: int = 3
    gpu: bool = False

    @property
    def media_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1


SHAPES = {
    "cpu": Shapes(name="cpu", d=256, layers=8, heads=8, kv_heads=2, ffn=1024, vocab=32000, xattn=[3, 7],
                  threads=2, gen_reps=5),
    "1b-xattn": Shapes(name="1b-xattn", d=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256,
                       xattn=[3, 7, 11, 15], image_size=560, patch=14, vit_width=1280, vit_layers=32,
                       vit_head_width=80, vit_mlp_ratio=4.0, vit_indices=[3, 7, 15, 23, 30], gated_layers=8,
                       dtype="bfloat16", train_batch=8, train_len=1024, gen_prompt=32, gen_new=64,
                       gen_batches=(1, 16), gen_reps=3, gpu=True),
    # for tests only: seconds on a CPU
    "micro": Shapes(name="micro", d=64, layers=4, heads=4, kv_heads=2, ffn=256, vocab=512, xattn=[1, 3],
                    image_size=16, patch=8, vit_width=32, vit_layers=2, vit_head_width=16, vit_indices=[0],
                    train_batch=2, train_len=16, warmup=1, timed=2, gen_prompt=4, gen_new=4, gen_batches=(1, 2),
                    gen_reps=1),
}

RECORD_REPS = 3  # timed runs of the CPU's extra decoding paths (reported, not in the goals)

ENCODER_NOTE = ("image encoders of equal size on both sides: ours an open_clip ViT ({w} wide, {l} layers, "
                "patch {p}, {s} px, features of layers {idx} + last) with {g} gated global layer(s); the peer "
                "MllamaVisionModel with the same widths, depths and feature layers, one tile (max_num_tiles=1); "
                "both project to (B, {m}, {d}) media features")


# -- building the two models ---------------------------------------------------------------
def _rope(cfg_cls, theta: float, **kw):
    try:
        return cfg_cls(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:
        return cfg_cls(**kw, rope_theta=theta)


def build_ours(s: Shapes, device, dtype):
    """LlamaForCausalLM (random, frozen) + our image modality (open_clip ViT + gated
    cross-attention before ``s.xattn``)."""
    import transformers as tf

    from adapters.cross_attention import GatedCrossAttention
    from encoders.image import ImageEncoder, build_vit
    from mm.llm import freeze
    from mm.modality import Modality
    from mm.model import MultimodalLM

    cfg = _rope(tf.LlamaConfig, s.rope_theta, vocab_size=s.vocab, hidden_size=s.d, intermediate_size=s.ffn,
                num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                max_position_embeddings=max(2048, s.train_len * 2), pad_token_id=0, bos_token_id=1,
                eos_token_id=None, tie_word_embeddings=s.tie_embeddings)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        llm = tf.LlamaForCausalLM(cfg)
        vit = build_vit(preset="tiny", image_size=s.image_size, patch_size=s.patch, width=s.vit_width,
                        layers=s.vit_layers, head_width=s.vit_head_width, mlp_ratio=s.vit_mlp_ratio)
        enc = ImageEncoder(vit=vit, layer_indices=list(s.vit_indices), out_dim=s.d, gated_layers=s.gated_layers,
                           max_tiles=1)
        xattn = {i: GatedCrossAttention(dim=s.d, media_dim=s.d, n_heads=s.heads, n_kv_heads=s.kv_heads,
                                        head_dim=s.d // s.heads, ffn_dim=s.ffn, norm_eps=cfg.rms_norm_eps)
                 for i in s.xattn}
        mod = Modality(kind="xattn", encoder=enc, xattn=xattn)
    llm = freeze(llm.to(dtype))
    return MultimodalLM(llm, {"image": mod.to(device=device, dtype=dtype)})


def build_peer(s: Shapes, device, dtype):
    """MllamaForConditionalGeneration (random) at the same shapes: a cross-attention layer
    before the same self-attention layers (HF numbering shifts by the ones before it)."""
    import transformers as tf

    n = len(s.vit_indices)
    vc = tf.MllamaVisionConfig(hidden_size=s.vit_width, attention_heads=s.vit_width // s.vit_head_width,
                               intermediate_size=int(s.vit_width * s.vit_mlp_ratio), num_hidden_layers=s.vit_layers,
                               num_global_layers=s.gated_layers, image_size=s.image_size, patch_size=s.patch,
                               max_num_tiles=1, supported_aspect_ratios=[[1, 1]],
                               intermediate_layers_indices=list(s.vit_indices), vision_output_dim=s.vit_width * (n + 1))
    cross = [i + k for k, i in enumerate(sorted(s.xattn))]
    tc = _rope(tf.MllamaTextConfig, s.rope_theta, vocab_size=s.vocab, hidden_size=s.d, intermediate_size=s.ffn,
               num_hidden_layers=s.layers + len(cross), num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
               cross_attention_layers=cross, max_position_embeddings=max(2048, s.train_len * 2), pad_token_id=0,
               bos_token_id=1, eos_token_id=None)
    cfg = tf.MllamaConfig(vision_config=vc, text_config=tc)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        peer = tf.MllamaForConditionalGeneration(cfg)
    peer = peer.to(dtype)
    for p in peer.parameters():
        p.requires_grad_(False)
    peer.generation_config.eos_token_id = None
    peer.generation_config.pad_token_id = 0
    return peer


def set_trainable_ours(model, encoder_trainable: bool) -> list:
    from mm.trainable import set_trainable
    pre = ["image"] if encoder_trainable else ["image.xattn", "image.encoder.norm", "image.encoder.proj"]
    set_trainable(model, pre)
    return [p for p in model.parameters() if p.requires_grad]


def set_trainable_peer(peer, encoder_trainable: bool) -> list:
    for p in peer.parameters():
        p.requires_grad_(False)
    lm = peer.model.language_model
    parts = [lm.layers[i] for i in lm.cross_attention_layers] + [peer.model.multi_modal_projector]
    if encoder_trainable:
        parts.append(peer.model.vision_model)
    for m in parts:
        for p in m.parameters():
            p.requires_grad_(True)
    return [p for p in peer.parameters() if p.requires_grad]


def train_mode(ours, peer, encoder_trainable: bool) -> None:
    """Training mode; a frozen vision tower runs in eval mode (neither has dropout, so this
    changes no result, but a frozen open_clip ViT then takes PyTorch's fused attention path)."""
    ours.train()
    if peer is not None:
        peer.train()
    if not encoder_trainable:
        enc = ours.modalities["image"].encoder
        enc.vit.eval()
        enc.blocks.eval()
        if peer is not None:
            peer.model.vision_model.eval()


def enter_mode(ours, peer, mode: str) -> dict:
    """Put both sides (``peer`` may be None) in a training mode (``trainable``/``frozen``
    vision encoder); returns each side's trainable parameters."""
    enc_tr = mode == "trainable"
    train_mode(ours, peer, enc_tr)
    out = {"ours": set_trainable_ours(ours, enc_tr)}
    if peer is not None:
        out["peer"] = set_trainable_peer(peer, enc_tr)
    return out


def training_step(loss_fn, opt):
    """One optimizer step on ``loss_fn()``, gradients dropped after it."""
    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def feature_cache_loss(ours, ids, att, media):
    """(cache, loss function) for our training step with the image features cached: the
    keys are the images' contents, and the cache is attached only during the call, so the
    other steps of ours run the whole encoder."""
    from mm.data import media_key
    from mm.modality import FeatureCache

    mod, mi = ours.modalities["image"], media["image"]
    n = mi.valid.numel()
    keyed = {"image": replace(mi, keys=[media_key({k: v[i] for k, v in mi.inputs.items()}) for i in range(n)])}
    cache = FeatureCache(64 * 2 ** 30)

    def loss():
        mod.feature_cache = cache
        try:
            return ours.loss(ids, ids, attention_mask=att, media=keyed)
        finally:
            mod.feature_cache = None
    return cache, loss


def make_optimizer(params):
    """The training loop's AdamW (fused where the kernel exists), for either side."""
    from mm.train import adamw

    return adamw(list(params), lr=1e-5, weight_decay=0.0)


# -- inputs --------------------------------------------------------------------------------
def inputs(s: Shapes, batch: int, length: int, device, dtype, seed: int = 0) -> dict:
    from mm.model import MediaInput

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, s.vocab, (batch, length), generator=g).to(device)
    pix = torch.randn(batch, 1, 3, s.image_size, s.image_size, generator=g).to(device=device, dtype=dtype)
    att = torch.ones(batch, length, dtype=torch.long, device=device)
    media = MediaInput(inputs={"pixels": pix, "tile_mask": torch.ones(batch, 1, dtype=torch.bool, device=device),
                               "aspect": torch.zeros(batch, dtype=torch.long, device=device)},
                       valid=torch.ones(batch, 1, dtype=torch.bool, device=device),
                       positions=torch.zeros(batch, 1, dtype=torch.long, device=device))  # image seen from the start
    peer = dict(pixel_values=pix[:, None], aspect_ratio_ids=torch.ones(batch, 1, dtype=torch.long, device=device),
                aspect_ratio_mask=torch.ones(batch, 1, 1, dtype=torch.long, device=device),
                cross_attention_mask=torch.ones(batch, length, 1, 1, dtype=torch.long, device=device))
    return dict(ids=ids, att=att, media={"image": media}, peer=peer)


# -- measuring -----------------------------------------------------------------------------
class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one call."""
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        self.sync()
        return time.perf_counter() - t0, time.process_time() - c0


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _proc_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def persistent_bytes(model, opt=None) -> int:
    n = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    if opt is not None:
        n += tensor_bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    return n


def measure_step_memory(fn, device, own_bytes: int) -> dict:
    """Peak memory of one call of ``fn``: the side's persistent bytes plus what the call
    allocates on top of everything already held (both models live in this process)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        return {"peak_bytes": own_bytes + extra, "step_bytes": extra}
    # CPU: big allocations are mmapped (and so leave the resident set when freed), the
    # high-water mark is reset, then the resident set's peak above the start is the step's.
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
        libc.malloc_trim(0)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _proc_kib("VmRSS")
        fn()
        peak = _proc_kib("VmHWM")
        extra = max(0, (peak - base) * 1024)
        return {"peak_bytes": own_bytes + extra, "step_bytes": extra, "process_peak_rss_bytes": peak * 1024}
    except (OSError, TypeError):
        fn()
        return {"peak_bytes": None, "step_bytes": None}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def alternate(clock: Clock, fns: dict, warmup: int, timed: int, log=None, cpu: dict | None = None
              ) -> dict[str, list[float]]:
    """Run each side ``warmup + timed`` times, alternating sides (and who goes first).
    Returns the wall times of the timed runs; ``cpu`` (if given) gets their process CPU times."""
    names = list(fns)
    times = {k: [] for k in names}
    for i in range(warmup + timed):
        order = names if i % 2 == 0 else names[::-1]
        now = {}
        for k in order:
            now[k] = clock.time(fns[k])
            if i >= warmup:
                times[k].append(now[k][0])
                if cpu is not None:
                    cpu.setdefault(k, []).append(now[k][1])
        if log:
            log(f"  {'warm-up' if i < warmup else 'step'} {i + 1}/{warmup + timed}: "
                + ", ".join(f"{k} {now[k][0]:.3f}s (cpu {now[k][1]:.2f}s)" for k in names))
    return times


# -- the benchmark -------------------------------------------------------------------------
def peak_flops(device) -> tuple[float | None, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name or "H200" in name or "H800" in name:
            return H100_BF16_PEAK, f"{name}: 989.4 TFLOP/s dense bf16 (datasheet)"
        if "A100" in name:
            return 312e12, f"{name}: 312 TFLOP/s dense bf16 (datasheet)"
        return None, f"{name}: peak unknown"
    # CPU: a measured fp32 matmul rate stands in for the peak
    a = torch.randn(1024, 1024)
    a @ a
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.3:
        a @ a
        n += 1
    rate = n * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    return rate, f"CPU: measured fp32 1024^3 matmul, {rate / 1e9:.0f} GFLOP/s"


@contextlib.contextmanager
def _part(res: dict, name: str, device, log):
    """Run one part of the protocol; an exception is recorded in ``res["errors"]`` (and its
    traceback logged) instead of ending the run, so the other parts are still measured."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure of one part; the rest still runs
        first = str(e).splitlines()[0] if str(e) else ""
        res.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {first}"[:300])
        log(f"{name} FAILED:\n{traceback.format_exc()}")
        _free(device)


def profile_step(fn, device, path: Path, title: str) -> None:
    """One call of ``fn`` under torch.profiler; the op table sorted by self time on the
    device (or the CPU) goes to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=70, max_name_column_width=60)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{title}\n{table}\n")


def run_bench(s: Shapes, device, *, log=None, compile_pass: bool = False, deadline: float | None = None,
              checkpoint=None, profile_dir: str | Path | None = None) -> dict:
    """Run the protocol; returns the results (see :func:`rows`). ``checkpoint(result)`` is
    called with partial results after each part; failed parts are listed in ``errors``."""
    start = time.perf_counter()
    log = log or (lambda *_: None)
    dtype = getattr(torch, s.dtype)
    threads = int(os.environ.get("MM_BENCH_THREADS") or 0) or s.threads
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
        s = replace(s, threads=threads)
    torch.manual_seed(0)
    clock = Clock(device)
    res: dict = {"shapes": dict(asdict(s), media_tokens=s.media_tokens), "device": str(device),
                 "versions": _versions(), "notes": [], "train": {}, "generate": {}}
    res["notes"].append(ENCODER_NOTE.format(w=s.vit_width, l=s.vit_layers, p=s.patch, s=s.image_size,
                                            idx=list(s.vit_indices), g=s.gated_layers, m=s.media_tokens, d=s.d))
    peak, peak_note = peak_flops(device)
    res["peak_flops"], res["notes"] = peak, res["notes"] + [f"MFU peak: {peak_note}"]
    log(f"building models ({s.name}, {device}, {s.dtype})")
    ours = build_ours(s, device, dtype)
    peer = build_peer(s, device, dtype)
    res["params"] = {"ours": sum(p.numel() for p in ours.parameters()),
                     "peer": sum(p.numel() for p in peer.parameters())}
    llm_count, enc_count = count_model(ours)

    # -- training
    x = inputs(s, s.train_batch, s.train_len, device, dtype)
    ids, att, media, pk = x["ids"], x["att"], x["media"], x["peer"]
    tokens = s.train_batch * s.train_len
    # peak memory is measured after every timing: on a CPU the measurement sets glibc's mmap
    # threshold (see measure_step_memory), and that would make every later big allocation of
    # either side page-fault afresh
    memory_later: list[tuple] = []  # (mode, side, model, step, optimizer, bytes held besides)

    def ours_loss():
        return ours.loss(ids, ids, attention_mask=att, media=media)

    # the frozen encoder's features cached per image (MM_BENCH_CACHE=0: not measured): the
    # ViT and its gated layers run once per image, then only the norm and projection do
    use_cache = os.environ.get("MM_BENCH_CACHE", "1") != "0"
    cache, ours_cached_loss = feature_cache_loss(ours, ids, att, media) if use_cache else (None, None)

    for mode in ("trainable", "frozen"):
        with _part(res, f"training, encoder {mode}", device, log):
            opts = {side: make_optimizer(ps) for side, ps in enter_mode(ours, peer, mode).items()}
            fns = {"ours": training_step(ours_loss, opts["ours"]),
                   "peer": training_step(lambda: peer(input_ids=ids, attention_mask=att, labels=ids, use_cache=False,
                                                      **pk).loss, opts["peer"])}
            if mode == "frozen" and use_cache:
                fns["ours+cache"] = training_step(ours_cached_loss, opts["ours"])
            log(f"training, vision encoder {mode}")
            cpu = {}
            times = alternate(clock, fns, s.warmup, s.timed, log, cpu)
            step_flops = partial(train_step_flops, llm_count, batch=s.train_batch, text_len=s.train_len,
                                 media_tokens=s.media_tokens, encoder=enc_count)
            part = {"flops": step_flops(encoder_trainable=mode == "trainable")}
            if "ours+cache" in fns:
                part["flops_cached"] = step_flops(features_cached=True)
            for side, fn in fns.items():
                model, opt = (peer, opts["peer"]) if side == "peer" else (ours, opts["ours"])
                part[side] = _step_stats(times[side], cpu[side], tokens, _side_flops(part, side), peak)
                memory_later.append((mode, side, model, fn, opt, _held(cache, side)))
            if "ours+cache" in fns:
                part["ours+cache"]["cache"] = cache.stats()
                res["notes"].append(
                    "ours+cache: the frozen encoder's output before its trained norm and projection is computed once per "
                    "image and reused (feature_cache:, mm.modality.FeatureCache); PERFORMANCE.md counts a cached "
                    f"encoder as 0 FLOPs, so its MFU counts {_flop_text(part['flops_cached']['total'])} of the "
                    f"{_flop_text(part['flops']['total'])} a step")
            res["train"][mode] = part
            if profile_dir:
                for side, fn in fns.items():
                    profile_step(fn, device, Path(profile_dir) / f"profile_train_{mode}_{side}.txt",
                                 f"{s.name}: one training step, {side}, vision encoder {mode}")
        opts = fns = None
        _free(device)
        if checkpoint:
            checkpoint(res)

    # -- generation
    ours.eval()
    peer.eval()
    for p in list(ours.parameters()) + list(peer.parameters()):
        p.requires_grad_(False)
    cpu_side = device.type == "cpu"
    # CPU: the fast path and its compiled step are opt-in, so opt in (a GPU captures the step
    # as a CUDA graph instead); the uncompiled and the reference paths are timed for the record
    fast = True if cpu_side else None
    gen_batches = s.gen_batches if os.environ.get("MM_BENCH_GENERATE", "1") != "0" else ()
    for b in gen_batches:
        with _part(res, f"generation, batch {b}", device, log):
            g = inputs(s, b, s.gen_prompt, device, dtype, seed=1)
            out = {}

            def gen_ours(g=g, out=out):
                out["ours"] = ours.generate(g["ids"], g["att"], media=g["media"], max_new_tokens=s.gen_new, fast=fast,
                                            compiled=cpu_side)

            def gen_peer(g=g, out=out):
                out["peer"] = peer.generate(input_ids=g["ids"], attention_mask=g["att"], max_new_tokens=s.gen_new,
                                            do_sample=False, eos_token_id=None, pad_token_id=0, **g["peer"])

            first_call = None
            if cpu_side:
                log(f"generation, batch {b}: compiling our decoding step")
                t0 = time.perf_counter()
                gen_ours()
                first_call = time.perf_counter() - t0
            log(f"generation, batch {b}")
            cpu = {}
            with torch.no_grad():
                times = alternate(clock, {"ours": gen_ours, "peer": gen_peer}, 1, s.gen_reps, log, cpu)
            if cpu_side:  # for the record, fewer runs: our uncompiled fast path and our default path
                def gen_eager(g=g, out=out):
                    out["ours_eager"] = ours.generate(g["ids"], g["att"], media=g["media"],
                                                      max_new_tokens=s.gen_new, fast=True)

                def gen_ref(g=g, out=out):
                    out["ours_reference"] = ours.generate(g["ids"], g["att"], media=g["media"],
                                                          max_new_tokens=s.gen_new, fast=False)
                log(f"generation, batch {b}: our other decoding paths")
                with torch.no_grad():
                    times.update(alternate(clock, {"ours_eager": gen_eager, "ours_reference": gen_ref}, 1,
                                           RECORD_REPS, log, cpu))
                for key in ("ours_eager", "ours_reference"):
                    if not torch.equal(out[key], out["ours"]):
                        res["notes"].append(f"generation, batch {b}: {key} made other tokens than ours (rounding)")
            if tuple(out["ours"].shape) != (b, s.gen_new) or tuple(out["peer"].shape) != (b, s.gen_prompt + s.gen_new):
                raise RuntimeError(f"generation made the wrong number of tokens: ours {tuple(out['ours'].shape)}, "
                                   f"peer {tuple(out['peer'].shape)}")
            if device.type == "cuda" and b == s.gen_batches[0]:  # the fast path against the reference path
                with torch.no_grad():
                    ref = ours.generate(g["ids"], g["att"], media=g["media"], max_new_tokens=s.gen_new, fast=False)
                same = (ref == out["ours"]).all(0).long()
                res["fast_decode_check"] = {"batch": b, "equal": bool(same.all()),
                                            "leading_equal_tokens": int(same.cumprod(0).sum())}
            res["generate"][str(b)] = {k: {"s": _median(v), "runs_s": v, "new_tokens_per_s": b * s.gen_new / _median(v),
                                           "min_s": min(v), "cpu_s": _median(cpu[k])}
                                       for k, v in times.items()}
            if profile_dir:
                with torch.no_grad():
                    for side, fn in (("ours", gen_ours), ("peer", gen_peer)):
                        profile_step(fn, device, Path(profile_dir) / f"profile_generate_{b}_{side}.txt",
                                     f"{s.name}: one generation call, {side}, batch {b}")
            if first_call is not None:
                res["generate"][str(b)]["ours"]["first_call_s"] = first_call
                res["notes"].append(f"generation, batch {b}: our first call (compiling the decoding step) took "
                                    f"{first_call:.1f} s; not in the timed runs")
        if checkpoint:
            checkpoint(res)

    # -- optional: ours with regional torch.compile (training only)
    if compile_pass:
        from mm.compile import compiled_blocks

        # which encoder blocks compile: MM_BENCH_COMPILE_ENCODERS=1 all, 0 none, unset: those
        # that train in the mode (compiled_blocks' default), so each mode enters its own context
        enc_env = os.environ.get("MM_BENCH_COMPILE_ENCODERS")
        encoders = None if enc_env in (None, "") else enc_env != "0"
        if encoders is not None:
            res["notes"].append(f"compile pass: encoder blocks {'all' if encoders else 'none'} compiled "
                                f"(MM_BENCH_COMPILE_ENCODERS={enc_env})")
        compiled_later: list[tuple] = []
        for mode in ("frozen", "trainable"):
            if mode not in res["train"]:
                continue
            if deadline is not None and time.perf_counter() - start > deadline:
                res["notes"].append(f"compile pass, encoder {mode}: skipped, past the deadline")
                continue
            with _part(res, f"training with torch.compile, encoder {mode}", device, log):
                opt = make_optimizer(enter_mode(ours, None, mode)["ours"])
                fns = {"ours+compile": training_step(ours_loss, opt)}
                if "ours+cache" in res["train"][mode]:
                    fns["ours+compile+cache"] = training_step(ours_cached_loss, opt)
                log(f"training with torch.compile, vision encoder {mode} (first steps compile)")
                t0 = time.perf_counter()
                cpu = {}
                with compiled_blocks(ours, dynamic=False, encoders=encoders):
                    times = alternate(clock, fns, s.warmup, s.timed, log, cpu)
                    if profile_dir:
                        for side, fn in fns.items():
                            profile_step(fn, device, Path(profile_dir) / f"profile_train_{mode}_{side}.txt",
                                         f"{s.name}: one training step, {side}, vision encoder {mode}")
                wall = time.perf_counter() - t0
                for side, fn in fns.items():
                    res["train"][mode][side] = dict(
                        _step_stats(times[side], cpu[side], tokens, _side_flops(res["train"][mode], side), peak),
                        wall_incl_compile_s=wall)
                    compiled_later.append((mode, side, ours, fn, opt, _held(cache, side)))
            opt = fns = None
            if checkpoint:
                checkpoint(res)
        # after every timing (see memory_later); each mode's blocks compiled again
        _measure_memory(res, compiled_later, ours, None, device, log,
                        context=lambda: compiled_blocks(ours, dynamic=False, encoders=encoders))
        compiled_later = None
        _free(device)
    _measure_memory(res, memory_later, ours, peer, device, log)
    memory_later = None
    _free(device)
    if checkpoint:
        checkpoint(res)
    res["wall_s"] = time.perf_counter() - start
    res["rows"] = rows(res)
    res["goals"] = goals(res)
    return res


def _flop_text(flops: float) -> str:
    """``flops`` in the unit that keeps three significant figures readable (GFLOP on the CPU
    shapes, TFLOP on the GPU's)."""
    return f"{flops / 1e12:.2f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:.2f} GFLOP"


def _side_flops(part: dict, side: str) -> float:
    """A side's FLOPs a step: the cached count for the variants with cached features."""
    return part["flops_cached" if side.endswith("+cache") else "flops"]["total"]


def _held(cache, side: str) -> int:
    """Bytes a side holds besides its model and optimizer: the feature cache's."""
    return cache.bytes if side.endswith("+cache") else 0


def _step_stats(steps: list[float], cpu_steps: list[float], tokens: int, flops: float, peak) -> dict:
    t = _median(steps)
    return {"step_s": t, "steps_s": steps, "tokens_per_s": tokens / t, "min_step_s": min(steps),
            "cpu_step_s": _median(cpu_steps), "mfu": flops / (t * peak) if peak else None}


def _measure_memory(res: dict, jobs: list[tuple], ours, peer, device, log, context=contextlib.nullcontext) -> None:
    """Peak memory of one step of each (mode, side) whose timing is done, in the mode's
    trainable/eval state (and inside ``context()``, entered after it); added to
    ``res["train"][mode][side]``. A job's ``held`` bytes (a feature cache) count as the side's."""
    for mode, side, model, fn, opt, held in jobs:
        with _part(res, f"peak memory, encoder {mode}, {side}", device, log):
            enter_mode(ours, peer, mode)
            with context():
                res["train"][mode][side].update(measure_step_memory(fn, device, persistent_bytes(model, opt) + held))


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _versions() -> dict:
    import transformers
    v = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    try:
        import open_clip
        v["open_clip"] = open_clip.__version__
    except (ImportError, AttributeError):
        pass
    return v


# -- reporting -----------------------------------------------------------------------------
def _ratio(a, b):
    return a / b if a and b else None


# our training variants: eager, regional torch.compile, the frozen encoder's features cached
VARIANTS = ("ours", "ours+compile", "ours+cache", "ours+compile+cache")


def _label(variant: str) -> str:
    return "" if variant == "ours" else f", {variant}"


def rows(res: dict) -> list[dict]:
    """The table: metric, ours, peer, ratio (>1: ours better), unit."""
    out = []
    gib = 1024 ** 3
    for mode in ("trainable", "frozen"):
        p = res["train"].get(mode)
        if not p:
            continue
        q = p["peer"]
        sides = [v for v in VARIANTS if v in p]
        for v in sides:
            c = p[v]
            out.append(dict(metric=f"train text tokens/s, encoder {mode}{_label(v)}", ours=c["tokens_per_s"],
                            peer=q["tokens_per_s"], ratio=_ratio(q["step_s"], c["step_s"]), unit="tok/s",
                            ratio_min=_ratio(q.get("min_step_s"), c.get("min_step_s")),
                            ratio_cpu=_ratio(q.get("cpu_step_s"), c.get("cpu_step_s"))))
        for v in sides:
            c = p[v]
            if c.get("peak_bytes") and q.get("peak_bytes"):
                out.append(dict(metric=f"train peak memory, encoder {mode}{_label(v)}", ours=c["peak_bytes"] / gib,
                                peer=q["peak_bytes"] / gib, ratio=_ratio(q["peak_bytes"], c["peak_bytes"]),
                                unit="GiB"))
        for v in sides:
            c = p[v]
            if c.get("mfu") is not None:
                out.append(dict(metric=f"train MFU, encoder {mode}{_label(v)}", ours=c["mfu"], peer=q["mfu"],
                                ratio=_ratio(c["mfu"], q["mfu"]), unit="fraction"))
    for b, g in res["generate"].items():
        q = g["peer"]
        for key, label in (("ours", ""), ("ours_eager", ", ours step not compiled"),
                           ("ours_reference", ", ours reference path")):
            if key in g:
                o = g[key]
                out.append(dict(metric=f"generate new tokens/s, batch {b}{label}", ours=o["new_tokens_per_s"],
                                peer=q["new_tokens_per_s"], ratio=_ratio(q["s"], o["s"]), unit="tok/s",
                                ratio_min=_ratio(q.get("min_s"), o.get("min_s")),
                                ratio_cpu=_ratio(q.get("cpu_s"), o.get("cpu_s"))))
    return out


def goals(res: dict) -> list[dict]:
    """The issue's targets, checked against the results (the best of our variants, named)."""
    out = []
    gpu = res["shapes"].get("gpu")
    train_x, gen_x = (1.5, 3.0) if gpu else (1.3, 2.0)
    for mode in ("trainable", "frozen"):
        p = res["train"].get(mode)
        if not p:
            continue
        sides = [v for v in VARIANTS if v in p]
        name = min(sides, key=lambda v: p[v]["step_s"])
        best = p[name]
        r = p["peer"]["step_s"] / best["step_s"]
        out.append(dict(goal=f"train, encoder {mode}: >= {train_x}x peer ({name})", value=round(r, 3),
                        met=r >= train_x))
        if best.get("peak_bytes") and p["peer"].get("peak_bytes"):
            out.append(dict(goal=f"train peak memory, encoder {mode}: <= peer ({name})",
                            value=round(best["peak_bytes"] / p["peer"]["peak_bytes"], 3),
                            met=best["peak_bytes"] <= p["peer"]["peak_bytes"]))
        with_mfu = [v for v in sides if p[v].get("mfu") is not None]
        if gpu and with_mfu:
            top = max(with_mfu, key=lambda v: p[v]["mfu"])
            out.append(dict(goal=f"train MFU, encoder {mode}: >= 50% ({top})", value=round(p[top]["mfu"], 3),
                            met=p[top]["mfu"] >= 0.5))
    for b, g in res["generate"].items():
        r = g["peer"]["s"] / g["ours"]["s"]
        if gpu and b == "1":
            v = g["ours"]["new_tokens_per_s"]
            out.append(dict(goal="generate, batch 1: >= 300 new tokens/s", value=round(v, 1), met=v >= 300))
        elif not gpu or b != "1":
            out.append(dict(goal=f"generate, batch {b}: >= {gen_x}x peer", value=round(r, 3), met=r >= gen_x))
    return out


def format_table(res: dict) -> str:
    def fmt(v, unit):
        if v is None:
            return "-"
        if unit == "fraction":
            return f"{100 * v:.1f}%"
        if unit == "GiB":
            return f"{v:.3f}" if v < 10 else f"{v:.1f}"
        return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"

    s = res["shapes"]
    v = res["versions"]
    lines = [f"mm bench --shapes {s['name']}: {res['device']}, {s['dtype']}"
             + (f", {s['threads']} threads" if s.get("threads") and res["device"] == "cpu" else "")
             + f"; torch {v['torch']}, transformers {v['transformers']}",
             f"train: batch {s['train_batch']} x {s['train_len']} text tokens, one image each "
             f"({s['media_tokens']} media tokens), median of {s['timed']} steps after {s['warmup']}; "
             f"generate: {s['gen_prompt']}-token prompt + image, {s['gen_new']} new tokens, greedy"]
    lines += [f"note: {n}" for n in res["notes"]]
    cpu = res["device"] == "cpu"
    w = max(len(r["metric"]) for r in res["rows"]) if res["rows"] else 10
    x = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
    lines.append(f"{'':<{w}}  {'ours':>12}  {'peer':>12}  {'peer/ours':>9}"
                 + (f"  {'(min)':>7}  {'(cpu-s)':>7}" if cpu else ""))
    for r in res["rows"]:
        extra = f"  {x(r.get('ratio_min')):>7}  {x(r.get('ratio_cpu')):>7}" if cpu else ""
        lines.append(f"{r['metric']:<{w}}  {fmt(r['ours'], r['unit']):>12}  {fmt(r['peer'], r['unit']):>12}  "
                     f"{x(r['ratio']):>9}{extra}")
    lines.append("peer/ours: peer time / our time from the medians (MFU: ours / peer; memory: peer / ours); >1 is ours "
                 "better" + ("; (min): from the fastest runs; (cpu-s): from process CPU time, less sensitive to other "
                             "jobs on the machine (threads spinning at a barrier still count)" if cpu else ""))
    if "fast_decode_check" in res:
        c = res["fast_decode_check"]
        lines.append(f"fast decode vs reference decode, batch {c['batch']}: " + (
            "same tokens" if c["equal"] else f"first {c['leading_equal_tokens']} tokens equal (bf16 rounding)"))
    for err in res.get("errors", []):
        lines.append(f"FAILED {err}")
    for gl in res.get("goals", []):
        lines.append(f"goal {'met    ' if gl['met'] else 'NOT met'}  {gl['goal']}: {gl['value']}")
    if "wall_s" in res:
        lines.append(f"wall time {res['wall_s']:.0f} s")
    return "\n".join(lines)


def main(args) -> int:
    shapes = getattr(args, "shapes", "cpu") or "cpu"
    if shapes not in SHAPES:
        raise ValueError(f"unknown shapes {shapes!r}; choose one of {sorted(SHAPES)}")
    s = SHAPES[shapes]
    dev = getattr(args, "device", None) or ("cuda" if s.gpu else "cpu")
    device = torch.device(dev)
    if device.type == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        if not torch.cuda.is_available():
            raise RuntimeError(f"--shapes {shapes}: no CUDA device here")
        torch.backends.cuda.matmul.allow_tf32 = True
    elif s.gpu:
        raise ValueError(f"--shapes {shapes} is the GPU protocol; run it with a CUDA device")
    json_path = getattr(args, "json", None)

    def checkpoint(res):
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            res = dict(res, rows=rows(res), goals=goals(res), partial=True)
            Path(json_path).write_text(json.dumps(res, indent=2, default=str))

    deadline = os.environ.get("MM_BENCH_DEADLINE")
    res = run_bench(s, device, log=lambda m: print(m, file=sys.stderr, flush=True),
                    compile_pass=os.environ.get("MM_BENCH_COMPILE") == "1",
                    deadline=float(deadline) if deadline else None, checkpoint=checkpoint,
                    profile_dir=os.environ.get("MM_BENCH_PROFILE") or None)
    print(format_table(res))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2, default=str))
    return 1 if res.get("errors") else 0
