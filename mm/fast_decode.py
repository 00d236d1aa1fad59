"""Fast greedy decoding for :meth:`mm.model.MultimodalLM.generate`.

Notation: b=batch, t=prompt columns, L=cache columns, n=new tokens, m=media tokens,
k=key/value heads, r=query heads per key/value head, c=head width.

The prefill is the reference one (:meth:`MultimodalLM.run`: media encoded, cross-attention
keys/values projected once). Decoding then runs on static buffers: a KV cache of fixed
length L, the current token, positions and the column to write are device tensors updated
in place, so a decoding step has fixed shapes and no host synchronisation. On CUDA that step
is captured once as a CUDA graph and replayed (a 1B model's step is ~300 small kernels:
launching them one by one costs more than running them). The graph and its buffers are kept
per (batch, cache length, media shapes) and reused by later calls. On a CPU the step can
instead be compiled (``compiled=True``: TorchInductor's C++ code, its elementwise passes fused
and its Python wrapper replaced by C++), once per decoder: ~25-40 s on 2 cores the first time
(kept in TorchInductor's on-disk cache, ~10 s in a later process), so it pays off over many
calls at the same shapes (a benchmark, a server with fixed batch shapes), not for one caption.

Only Llama-style decoders (llama, mistral, qwen2 without sliding windows, plain RoPE) take
this path: the step re-implements their layer from the LLM's own modules (norms, MLP,
projections, rotary embedding), which reads their weights in place. Others return None and
the caller decodes the reference way. The tokens equal the reference path's up to
floating-point rounding (attention over L masked columns instead of t).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
import weakref

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
EOS_CHECK_EVERY = 8  # decoding steps between host checks for all-rows-finished
# CPU product orders for decoding (see choose_orders): "measure" (default) times them once per
# shape on this machine; "0" uses the modules' own; "packed", "wxt" or "linear" force one
CPU_LAYOUT = os.environ.get("MM_DECODE_CPU_LAYOUT", "measure")
ORDERS = ("linear", "wxt")  # an nn.Linear's x W^T, or (W x^T)^T on the same weight
PACKED_ROLES = ("qkv", "gate_up", "head")  # products that may use the (in, out) copies

_decoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def unsupported(model, length: int | None = None) -> str | None:
    """Why ``model`` cannot use the fast path (None when it can)."""
    cfg = model.llm.config
    if cfg.model_type not in SUPPORTED_TYPES:
        return f"model type {cfg.model_type}"
    window = getattr(cfg, "sliding_window", None)
    uses_window = window is not None and (cfg.model_type != "qwen2" or getattr(cfg, "use_sliding_window", False))
    if uses_window and (length is None or length > window):
        return "sliding-window attention"
    if any(lt != "full_attention" for lt in (getattr(cfg, "layer_types", None) or [])):
        if uses_window or cfg.model_type != "qwen2":
            return "non-full attention layers"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
        return "logit soft-capping"
    rot = getattr(model.decoder, "rotary_emb", None)
    if rot is None or any(s in str(getattr(rot, "rope_type", "default")) for s in ("dynamic", "longrope")):
        return "rotary embedding type"
    layer = model.layers[0]
    at = getattr(layer, "self_attn", None)
    if at is None or not all(hasattr(at, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
        return "attention module layout"
    if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
        return "decoder layer layout"
    if getattr(model.decoder, "norm", None) is None:
        return "final norm"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _cache_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


class PackedWeights:
    """Decode-time copies of the frozen LLM's widening projections for a CPU: q/k/v and
    gate/up concatenated, and the LM head, laid out (in, out).

    Why: a decoding step multiplies a few rows by every weight matrix, so on a CPU it is
    bound by how fast the weights stream through the cores, and that depends on the product
    order the BLAS library is given, differently on different CPUs. With MKL and 2 threads, a
    32000 x 256 LM head: on an AMD EPYC (weights out of cache) one row ``x @ W.T``
    (nn.Linear's order) 3.3-4.7 ms, ``x @ W_in_out`` 1.2-1.9 ms; four rows ``x @ W.T``
    7.3-7.9 ms, ``(W @ x.T).T`` 2.4 ms, ``x @ W_in_out`` 5.9 ms. On an Intel Xeon with
    AVX-512 four rows take 1.6, 2.0 and 1.3 ms, and ``(W @ x.T).T`` is 2-4x slower than
    nn.Linear on the layers' matrices. So the order is not fixed: :func:`choose_orders` times
    them on the machine. The copies (about two thirds of the layers' weights, and the head)
    are built on the first call that uses them; the LLM is frozen, so they cannot go stale,
    and they are rebuilt if its weights are replaced.
    """

    def __init__(self, model):
        self.layers = [{role: _in_out(*lins) for role, lins in _layer_roles(layer).items()}
                       for layer in model.layers]
        self.head = _in_out(model.llm.get_output_embeddings())


def _layer_roles(layer) -> dict[str, list[torch.nn.Linear]]:
    """A decoder layer's products that :class:`PackedWeights` concatenates, by role."""
    at, mlp = layer.self_attn, layer.mlp
    return {"qkv": [at.q_proj, at.k_proj, at.v_proj], "gate_up": [mlp.gate_proj, mlp.up_proj]}


def _in_out(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([lin.weight.detach() for lin in linears], 0).t().contiguous()  # (in, out)
    biases = [lin.bias for lin in linears]
    if all(b_ is None for b_ in biases):
        return weight, None
    bias = torch.cat([b_.detach() if b_ is not None else lin.weight.new_zeros(lin.out_features)
                      for b_, lin in zip(biases, linears)])
    return weight, bias


def _packed_mm(x: torch.Tensor, weight_bias) -> torch.Tensor:
    weight, bias = weight_bias
    return torch.addmm(bias, x, weight) if bias is not None else x @ weight


_packs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_orders: dict = {}  # (rows, dtype, threads, shapes) -> choose_orders' result


def _linear_in(order: str, lin: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin(x)`` for x (b, in) in the given product order."""
    if order == "wxt":
        y = torch.mm(lin.weight, x.t()).t()  # (b, out)
        return y + lin.bias if lin.bias is not None else y
    return F.linear(x, lin.weight, lin.bias)


def _fastest(fns: dict, reps: int = 11) -> str:
    """The key of the fastest callable (median of ``reps`` runs, taken in turns). Before each
    run an 8 MB buffer is written, so the weights come from beyond the core's L2 cache, as in
    a decoding step that streams all of them (timed hot, one matrix at a time, the orders
    rank differently)."""
    junk = torch.empty(2 << 20)
    for f in fns.values():
        f()
    times: dict = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            junk.fill_(1.0)
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return min(times, key=lambda k: statistics.median(times[k]))


def choose_orders(model, rows: int) -> dict:
    """The product orders a CPU decoding step with ``rows`` rows uses, timed on this machine
    once per shape (well under a second at the bench's shapes) and kept for the process.

    Returns ``{"by_shape": {(out, in): "linear" | "wxt"}, "packed": set of PACKED_ROLES}``:
    every nn.Linear of the step runs in its shape's order, except the roles in ``packed``,
    which use :class:`PackedWeights`' copies (one product for q/k/v, one for gate/up).
    """
    layer = model.layers[0]
    head = model.llm.get_output_embeddings()
    roles = {**_layer_roles(layer), "head": [head]}
    linears = [layer.self_attn.o_proj, layer.mlp.down_proj, *sum(roles.values(), [])]
    for mod in model.modalities.values():
        if mod.kind == "xattn":
            linears += [m for blk in mod.xattn.values() for m in blk.modules() if isinstance(m, torch.nn.Linear)]
    shapes = {}
    for lin in linears:
        shapes.setdefault(tuple(lin.weight.shape), lin)
    dtype = head.weight.dtype
    key = (rows, dtype, torch.get_num_threads(), CPU_LAYOUT, tuple(sorted(shapes)))
    if key in _orders:
        return _orders[key]
    if CPU_LAYOUT in ("linear", "wxt", "packed"):  # forced
        one = CPU_LAYOUT if CPU_LAYOUT in ORDERS else "linear"
        _orders[key] = out = {"by_shape": dict.fromkeys(shapes, one),
                              "packed": set(roles) if CPU_LAYOUT == "packed" else set()}
        return out
    with torch.no_grad():
        by_shape = {}
        for shape, lin in shapes.items():
            x = torch.randn(rows, shape[1], dtype=dtype)
            by_shape[shape] = _fastest({o: (lambda o=o: _linear_in(o, lin, x)) for o in ORDERS})
        packed = set()
        for role, lins in roles.items():
            x = torch.randn(rows, lins[0].in_features, dtype=dtype)
            copy = _in_out(*lins)
            if _fastest({"packed": lambda: _packed_mm(x, copy),
                         "apart": lambda: [_linear_in(by_shape[tuple(m.weight.shape)], m, x) for m in lins]}) == "packed":
                packed.add(role)
    _orders[key] = out = {"by_shape": by_shape, "packed": packed}
    return out


def packed_weights(model) -> PackedWeights:
    """The model's :class:`PackedWeights`, built on first use and kept with the model
    (rebuilt when the LLM's weights are swapped or written in place)."""
    key = tuple((p.data_ptr(), p._version) for p in model.llm.parameters())  # _version: in-place writes
    kept = _packs.get(model)
    if kept is None or kept[0] != key:
        _packs[model] = kept = (key, PackedWeights(model))
    return kept[1]


class StaticDecoder:
    """Buffers (and on CUDA the graph) of greedy decoding for one set of shapes.

    Args:
        model: the MultimodalLM.
        batch: b. length: L, cache columns (prompt + new tokens).
        steps: n, tokens produced per call (the first comes from the prefill).
        media: [(modality name, layer index, m, row_only)] of the cross-attention states.
        graph: capture the step as a CUDA graph.
        compiled: run the step compiled by torch.compile (CPU; without a graph).
    """

    def __init__(self, model, *, batch: int, length: int, steps: int, media: list[tuple],
                 dtype: torch.dtype, device: torch.device, graph: bool, compiled: bool = False):
        self.model = model
        # product orders: the modules' own (GPU); on a CPU the ones choose_orders measured
        self.cpu = device.type == "cpu" and CPU_LAYOUT != "0"
        self.orders = choose_orders(model, batch) if self.cpu else {"by_shape": {}, "packed": set()}
        self.packs = self.orders["packed"]  # roles that use PackedWeights' copies
        self.packed: PackedWeights | None = None  # set per call when self.packs is not empty
        cfg = model.llm.config
        self.b, self.L, self.n = batch, length, steps
        at = model.layers[0].self_attn
        self.c = getattr(at, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kh = cfg.num_key_value_heads or cfg.num_attention_heads
        self.h = cfg.num_attention_heads
        z = dict(device=device, dtype=dtype)
        self.k = [torch.zeros(batch, self.kh, length, self.c, **z) for _ in model.layers]
        self.v = [torch.zeros(batch, self.kh, length, self.c, **z) for _ in model.layers]
        self.bias = torch.zeros(batch, 1, 1, length, **z)  # key columns to attend: 0, others -inf
        self.cos = torch.zeros(length, self.c, **z)  # rotary table by position
        self.sin = torch.zeros(length, self.c, **z)
        self.tok = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.idx = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(batch, steps, dtype=torch.long, device=device)
        # cross-attention: layer -> [(block, k, v, start, valid, row_only)]
        self.xattn: dict[int, list] = {}
        for name, i, m, row_only in media:
            blk = model.modalities[name].xattn[str(i)]
            kb = torch.zeros(batch, blk.n_kv_heads, m, blk.head_dim, **z)
            self.xattn.setdefault(i, []).append(dict(
                name=name, block=blk, k=kb, v=torch.zeros_like(kb), row_only=row_only,
                start=torch.zeros(batch, m, dtype=torch.long, device=device),
                valid=torch.zeros(batch, m, dtype=torch.bool, device=device)))
        self.graph = None
        # the whole step compiled as one graph: per-layer regions (one compiled layer for all)
        # compile in ~2/3 of the time but pay dynamo's guards on every call, ~0.2 ms a layer,
        # and kept only half the gain at one row (measured at the bench's CPU shapes)
        self.step = _compiled(self._step, device) if compiled and not graph else self._step
        if graph:
            self._capture()

    # -- one decoding step on the static buffers ---------------------------------------
    def _linear(self, lin: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``lin(x)`` for x (b, ..., in) (one column per row); on a CPU in the product order
        measured fastest for its shape (see choose_orders)."""
        order = self.orders["by_shape"].get(tuple(lin.weight.shape), "linear") if self.cpu else None
        if order is None:
            return lin(x)
        return _linear_in(order, lin, x.reshape(self.b, -1)).view(*x.shape[:-1], -1)

    def _attention(self, layer, x: torch.Tensor, cos, sin, kc, vc, packed) -> torch.Tensor:
        at = layer.self_attn
        b, c, h, kh = self.b, self.c, self.h, self.kh
        if packed is not None and "qkv" in self.packs:  # one (d, (h + 2k) c) product
            qkv = _packed_mm(x.view(b, -1), packed["qkv"])
            qk = qkv[:, : (h + kh) * c].view(b, h + kh, c)
            v = qkv[:, (h + kh) * c:].view(b, kh, 1, c)
        else:
            q = self._linear(at.q_proj, x).view(b, -1, c)  # (b, h, c)
            k = self._linear(at.k_proj, x).view(b, -1, c)  # (b, k, c)
            v = self._linear(at.v_proj, x).view(b, kh, 1, c)
            qk = torch.cat([q, k], dim=1)
        qk = (qk * cos) + (_rotate_half(qk) * sin)  # rotary on queries and keys at once, as HF applies it
        q, k = qk[:, :h], qk[:, h:, None]  # (b, h, c), (b, k, 1, c)
        kc.index_copy_(2, self.col, k)
        vc.index_copy_(2, self.col, v)
        qg = q.reshape(b, kh, h // kh, c)  # query heads of a group as query rows
        a = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=self.bias, scale=at.scaling)
        return self._linear(at.o_proj, a.reshape(b, 1, h * c))

    def _mlp(self, layer, x: torch.Tensor, packed) -> torch.Tensor:
        mlp = layer.mlp
        if packed is not None and "gate_up" in self.packs:
            gu = _packed_mm(x.view(self.b, -1), packed["gate_up"])  # (b, 2f)
            g, u = gu.split(gu.shape[-1] // 2, dim=-1)
            return self._linear(mlp.down_proj, (mlp.act_fn(g) * u).view(self.b, 1, -1))
        return self._linear(mlp.down_proj, mlp.act_fn(self._linear(mlp.gate_proj, x)) * self._linear(mlp.up_proj, x))

    def _layer(self, layer, x: torch.Tensor, cos, sin, kc, vc, packed) -> torch.Tensor:
        """One decoder layer; its KV cache (kc, vc) is written at the current column."""
        x = x + self._attention(layer, layer.input_layernorm(x), cos, sin, kc, vc, packed)
        return x + self._mlp(layer, layer.post_attention_layernorm(x), packed)

    def _xattn(self, block, x: torch.Tensor, k, v, start, valid, row_only: bool) -> torch.Tensor:
        if row_only:
            mask = self.pos[:, :, None] >= start[:, None, :1]  # (b, 1, 1)
        else:
            mask = (self.pos[:, :, None] >= start[:, None, :]) & valid[:, None, :]
        return block(x, (k, v), mask, linear=self._linear)

    def _next_token(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and "head" in self.packs:
            return _packed_mm(x, self.packed.head).argmax(-1)
        if not self.cpu:
            return self.model.logits(x).argmax(-1)
        return self._linear(self.model.llm.get_output_embeddings(), x).argmax(-1)

    def _step(self) -> None:
        model, b = self.model, self.b
        x = model.llm.get_input_embeddings()(self.tok.view(b, 1))  # (b, 1, d)
        cos = F.embedding(self.pos, self.cos)  # (b, 1, c), = rotary_emb(x, pos)
        sin = F.embedding(self.pos, self.sin)
        self.bias.index_fill_(3, self.col, 0.0)
        for i, layer in enumerate(model.layers):
            for xa in self.xattn.get(i, ()):
                x = self._xattn(xa["block"], x, xa["k"], xa["v"], xa["start"], xa["valid"], xa["row_only"])
            packed = self.packed.layers[i] if self.packed is not None else None
            x = self._layer(layer, x, cos, sin, self.k[i], self.v[i], packed)
        x = model.decoder.norm(x)
        nxt = self._next_token(x[:, -1])  # (b,)
        self.out.index_copy_(1, self.idx, nxt[:, None])
        self.tok.copy_(nxt)
        self.pos += 1
        self.col += 1
        self.idx += 1

    def _reset_counters(self) -> None:
        self.col.zero_()
        self.idx.zero_()

    def _capture(self) -> None:
        self._reset_counters()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm up (cuBLAS handles, kernel selection) off the capture
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self._reset_counters()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    # -- a call ------------------------------------------------------------------------
    def load(self, cache, attention_mask: torch.Tensor, cross: dict, first: torch.Tensor) -> None:
        t = attention_mask.shape[1]
        for i in range(len(self.k)):
            k, v = _cache_kv(cache, i)
            self.k[i][:, :, :t].copy_(k)
            self.k[i][:, :, t:].zero_()
            self.v[i][:, :, :t].copy_(v)
            self.v[i][:, :, t:].zero_()
        self.bias.fill_(float("-inf"))
        self.bias[:, 0, 0, :t].masked_fill_(attention_mask.bool(), 0.0)
        cos, sin = self.model.decoder.rotary_emb(self.bias[:1, 0], torch.arange(self.L, device=self.pos.device)[None])
        self.cos.copy_(cos[0])
        self.sin.copy_(sin[0])
        for i, entries in self.xattn.items():
            for xa in entries:
                state = cross[xa["name"]]
                k, v = state.kv[i]
                xa["k"].copy_(k)
                xa["v"].copy_(v)
                xa["start"].copy_(state.start)
                xa["valid"].copy_(state.valid)
        self.tok.copy_(first)
        self.pos.copy_(attention_mask.long().sum(-1, keepdim=True))
        self.col.fill_(t)
        self.idx.fill_(1)
        self.out.zero_()
        self.out[:, 0] = first

    def decode(self, eos: set) -> int:
        """Run the steps; returns how many tokens of ``out`` are produced (all of them, or
        fewer when every row has ended: the reference path stops there too)."""
        done_ids = torch.tensor(sorted(eos), device=self.out.device) if eos else None
        made = 1
        while made < self.n:
            todo = min(EOS_CHECK_EVERY, self.n - made) if eos else self.n - made
            for _ in range(todo):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self.step()
            made += todo
            if eos and bool(torch.isin(self.out[:, :made], done_ids).any(1).all()):
                break
        return made


def _compiled(fn, device: torch.device):
    """``fn`` compiled on its first call; where compiling fails (no C++ compiler, an
    unsupported op) one warning, then ``fn`` itself."""
    # cpp_wrapper: the graph's wrapper as C++ too (bench CPU shapes, one row: 285 -> 225 ms a
    # 32-token call against 393 ms uncompiled; the same compile time, ~30 s)
    opts = {"cpp_wrapper": True} if device.type == "cpu" else None
    state = {"fn": torch.compile(fn, dynamic=False, fullgraph=True, options=opts)}

    def run(*args):
        try:
            return state["fn"](*args)
        except Exception as e:  # any compiler failure: run eagerly instead
            if state["fn"] is fn:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            warnings.warn(f"fast decode: compiling the step failed ({type(e).__name__}: {first}); "
                          "decoding without it", stacklevel=2)
            state["fn"] = fn
            return fn(*args)
    return run


def _media_signature(cross: dict) -> list[tuple]:
    return sorted((name, i, state.kv[i][0].shape[2], state.row_only)
                  for name, state in cross.items() for i in state.kv)


def fast_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, media=None,
                  max_new_tokens: int = 32, eos: set | None = None, graph: bool | None = None,
                  compiled: bool = False):
    """Greedy decoding with the same result as the reference path of
    :meth:`MultimodalLM.generate`. Returns None when the model has no fast path.
    ``compiled``: the decoding step through torch.compile where no CUDA graph is used."""
    with torch.inference_mode():  # less per-op bookkeeping than no_grad; buffers never need autograd
        out = _fast_generate(model, input_ids, attention_mask, media=media, max_new_tokens=max_new_tokens,
                             eos=eos, graph=graph, compiled=compiled)
    return out.clone() if out is not None else None  # a normal tensor for the caller


def _fast_generate(model, input_ids, attention_mask, *, media, max_new_tokens, eos, graph, compiled):
    eos = set(eos or ())
    b, t = input_ids.shape
    if max_new_tokens < 2 or os.environ.get("MM_FAST_DECODE", "1") == "0":
        return None
    length = -(-(t + max_new_tokens) // 64) * 64  # padded: aligned key masks for SDPA kernels
    if unsupported(model, length) is not None:
        return None
    h, cache, _, encoded = model.run(input_ids, attention_mask, media=media, use_cache=True)
    cross = encoded[0]
    graph = input_ids.is_cuda if graph is None else graph
    sig = _media_signature(cross)
    compiled = compiled and not graph
    key = (b, length, max_new_tokens, tuple(sig), h.dtype, str(h.device), graph, compiled, CPU_LAYOUT,
           tuple(p.data_ptr() for p in model.parameters()))
    per_model = _decoders.setdefault(model, {})
    dec = per_model.get(key)
    if dec is None:
        while len(per_model) >= 4:  # bound the memory held by kept graphs/buffers
            per_model.pop(next(iter(per_model)))
        dec = StaticDecoder(model, batch=b, length=length, steps=max_new_tokens, media=sig,
                            dtype=h.dtype, device=h.device, graph=graph, compiled=compiled)
        per_model[key] = dec
    dec.packed = packed_weights(model) if dec.packs else None
    first = dec._next_token(h[:, -1])  # the first token through the decoder's product order too
    if eos and all(int(x) in eos for x in first):
        return model._finish(first[:, None], eos)
    dec.load(cache, attention_mask, cross, first)
    made = dec.decode(eos)
    ids = dec.out[:, :made].clone()
    if eos:  # stop where the reference path stops: the step at which every row has ended
        hit = torch.isin(ids, torch.tensor(sorted(eos), device=ids.device))
        first_hit = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(ids[:, 0], made))
        last = int(first_hit.max())
        if last < made:
            ids = ids[:, :last + 1]
    return model._finish(ids, eos)
