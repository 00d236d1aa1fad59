"""The ``mm`` command line.

Every user error (bad file, bad config, unknown modality...) ends with one line
``mm: error: <file>: <problem>`` and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("mm")


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _media_kind(path: str, types: dict) -> str:
    suffix = Path(path).suffix.lower()
    for name, t in types.items():
        if suffix in t.suffixes:
            return name
    known = sorted({s for t in types.values() for s in t.suffixes})
    raise ValueError(f"{path}: unrecognised file type {suffix or '(none)'!r} for this model (known: {' '.join(known)})")


def _print(rows: list[dict], as_json: bool, key: str) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for r in rows:
            print(f"{r['file']}: {r[key]}" if "file" in r else r[key])


def cmd_train(a) -> int:
    from mm.config import load_config
    from mm.train import train
    cfg = load_config(a.config, a.overrides)
    out = train(cfg, progress=not a.no_progress)
    print(f"run saved in {out}")
    return 0


def cmd_caption(a) -> int:
    from mm.infer import answer_records
    from mm.runs import load_run
    model, llm, types, cfg = load_run(a.model)
    recs = []
    for f in a.files:
        kind = _media_kind(f, types)
        if not Path(f).exists():
            raise ValueError(f"{f}: no such file")
        recs.append({kind: str(Path(f).resolve()), "question": a.prompt or types[kind].prompt})
    preds = answer_records(model, types, llm.tokenizer, recs, batch_size=a.batch_size,
                           max_new_tokens=a.max_new_tokens, preprocess=cfg.data.preprocess)
    _print([{"file": f, "caption": p} for f, p in zip(a.files, preds)], a.json, "caption")
    return 0


def cmd_ask(a) -> int:
    from mm.infer import answer_records, answer_text
    media: dict[str, list[str]] = {}
    # --image / --video / --audio name a kind of input; the model's modality of that type
    # may have another name (configs call the speech modality "audio").
    for kind, files in (("image", a.image), ("video", a.video), ("speech", a.audio)):
        for f in files or []:
            media.setdefault(f"@{kind}", []).append(f)
    for spec in a.input or []:
        if "=" not in spec:
            raise ValueError(f"--input {spec!r}: expected name=FILE")
        name, f = spec.split("=", 1)
        media.setdefault(name, []).append(f)
    for files in media.values():
        for f in files:
            if not Path(f).exists():
                raise ValueError(f"{f}: no such file")
    if not media:
        from mm.config import ModelConfig
        from mm.model import MultimodalLM
        from mm.runs import get_llm, load_run
        if a.model:
            model, llm, _, _ = load_run(a.model)
        else:
            llm = get_llm(ModelConfig(llm=a.llm))
            model = MultimodalLM(llm.model)
        if not a.question:
            raise ValueError("ask: give a question, or media with --image/--video/--audio/--input")
        text = answer_text(model, llm.tokenizer, a.question, max_new_tokens=a.max_new_tokens)
        _print([{"question": a.question, "answer": text}], a.json, "answer")
        return 0
    if not a.model:
        raise ValueError("ask: --model RUN_DIR is needed to answer about media")
    from mm.runs import load_run
    model, llm, types, cfg = load_run(a.model)
    for key in [k for k in media if k.startswith("@")]:
        names = [n for n, t in types.items() if t.name == key[1:]]
        if not names:
            raise ValueError(f"{a.model}: this model has no {key[1:]} modality (has: {', '.join(model.modalities)})")
        media.setdefault(names[0], []).extend(media.pop(key))
    for name in media:
        if name not in model.modalities:
            raise ValueError(f"{a.model}: this model has no {name!r} modality (has: {', '.join(model.modalities)})")
    rec = {n: [str(Path(f).resolve()) for f in fs] for n, fs in media.items()}
    if a.question:
        rec["question"] = a.question
    pred = answer_records(model, types, llm.tokenizer, [rec], max_new_tokens=a.max_new_tokens,
                          preprocess=cfg.data.preprocess)[0]
    _print([{"question": a.question, "answer": pred, **{k: v for k, v in rec.items() if k != "question"}}],
           a.json, "answer")
    return 0


def cmd_transcribe(a) -> int:
    from mm.runs import load_run
    from mm.speech import transcribe_files
    model, llm, types, cfg = load_run(a.model)
    rows = transcribe_files(model, types, llm.tokenizer, a.files, batch_size=a.batch_size)
    _print(rows, a.json, "text")
    return 0


def cmd_eval(a) -> int:
    from mm.evaluate import evaluate
    from mm.runs import load_run
    model, llm, types, cfg = load_run(a.model)
    sources = cfg.eval.sources
    if a.manifest:
        sources = [{"type": "manifest", "path": m, "name": m} for m in a.manifest]
    if not sources:
        raise ValueError(f"{a.model}: no eval sources in its config; give --manifest FILE")
    speech, other = _speech_sources(sources, types)
    res: dict = {}
    if other:
        res = evaluate(model, types, llm.tokenizer, other, batch_size=a.batch_size, preprocess=cfg.data.preprocess,
                       prefix_cache=cfg.eval.prefix_cache)
    if speech:  # WER and spoken-QA agreement instead of exact match
        from mm.speech import evaluate_speech
        res["speech"] = evaluate_speech(model, types, llm.tokenizer, speech, batch_size=a.batch_size)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    for task, r in res.items():
        if task == "speech":
            for label, v in r.items():
                print(f"{label}: WER {v['wer']:.3f} on {v['n']}" if "wer" in v else
                      f"{label}: answer agreement {v['qa_agreement']:.3f} exact, {v['answer_agreement']:.3f} "
                      f"by answer, on {v['n']} ({v['questions']} questions)")
        elif isinstance(r, dict):
            print(f"{task}: exact match {r['exact_match']:.3f} on {r['n']} (bad inputs: {r['bad']})")
    return 0


def _speech_sources(sources: list[dict], types: dict) -> tuple[list[dict], list[dict]]:
    """(speech sources, the others) of a run's eval sources: with a speech modality, the
    espeak sources, those of task asr/qa, and manifests whose records carry audio."""
    from mm.data import load_source
    from mm.modalities.speech import speech_modality_name
    try:
        name = speech_modality_name(types)
    except KeyError:
        return [], list(sources)
    speech, other = [], []
    for s in sources:
        is_speech = s.get("type") == "espeak" or s.get("task") in ("asr", "qa") or (
            s.get("type") == "manifest" and any(r.get(name) is not None for r in load_source(s, types)))
        (speech if is_speech else other).append(s)
    return speech, other


def cmd_modalities(a) -> int:
    from mm.modalities import builtin_types, get_type
    rows = [(n, t.kind, "built-in") for n, t in builtin_types().items()]
    if a.config:
        from mm.config import load_config
        cfg = load_config(a.config)
        for name, spec in cfg.model.modalities.items():
            t = get_type(spec.get("type", name))
            rows.append((name, t.kind, spec.get("type", name)))
    print(f"{'name':<12} {'adapter':<8} source")
    kinds = {"xattn": "cross-attention", "tokens": "token embeddings"}
    for n, k, src in rows:
        print(f"{n:<12} {k:<8} {src}  ({kinds[k]})")
    return 0


def cmd_demo(a) -> int:
    from mm.demo import run_demo
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    run_demo(Path(a.out), stages=stages, fast=a.fast, llm_spec=a.llm, seed=a.seed)
    return 0


def cmd_bench(a) -> int:
    from mm.bench import main as bench_main
    return bench_main(a)


def cmd_data_pack(a) -> int:
    from mm.shards import PackError, pack
    try:
        r = pack(a.manifest, a.out, shard_size=a.shard_size, skip_missing=a.skip_missing)
    except PackError as e:
        for f, where in e.report.missing:
            print(f"mm: missing file: {f} ({where})", file=sys.stderr)
        for bad in e.report.bad:
            print(f"mm: bad line: {bad}", file=sys.stderr)
        raise
    for f, where in r.missing:
        print(f"mm: skipped, missing file: {f} ({where})", file=sys.stderr)
    for bad in r.bad:
        print(f"mm: skipped, bad line: {bad}", file=sys.stderr)
    skipped = f" (skipped {len(r.missing)} missing files, {len(r.bad)} bad lines)" if r.missing or r.bad else ""
    print(f"packed {r.samples} samples into {len(r.shards)} shards in {r.out}{skipped}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm", description="Images, video and speech on a frozen language model.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="run one training stage from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("caption", help="caption images or videos")
    c.add_argument("--model", required=True, help="run directory")
    c.add_argument("files", nargs="+")
    c.add_argument("--prompt", default=None)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_caption)

    q = sub.add_parser("ask", help="ask about media, or the frozen LLM alone when no media are given")
    q.add_argument("question", nargs="?", default=None)
    q.add_argument("--model", default=None, help="run directory")
    q.add_argument("--llm", default="smollm2", help="LLM for text-only questions without --model")
    q.add_argument("--image", action="append")
    q.add_argument("--video", action="append")
    q.add_argument("--audio", action="append")
    q.add_argument("--input", action="append", help="name=FILE for any modality of the model")
    q.add_argument("--max-new-tokens", type=int, default=64)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_ask)

    s = sub.add_parser("transcribe", help="transcribe speech")
    s.add_argument("--model", required=True)
    s.add_argument("files", nargs="+")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_transcribe)

    e = sub.add_parser("eval", help="evaluate a run on its eval sources or a manifest (exact match per task; "
                                    "WER and spoken-QA answer agreement for speech)")
    e.add_argument("--model", required=True)
    e.add_argument("--manifest", action="append")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("modalities", help="list registered modalities")
    m.add_argument("--config", default=None)
    m.set_defaults(fn=cmd_modalities)

    d = sub.add_parser("demo", help="train and evaluate on real data on this machine's CPU")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--stages", default="image,video,speech")
    d.add_argument("--llm", default="smollm2")
    d.add_argument("--fast", action="store_true", help="a few steps of each stage (smoke test)")
    d.add_argument("--seed", type=int, default=0,
                   help="added to every training stage's seed (0: the configs as written; the data stay the same)")
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="speed against HF Mllama at the same shapes")
    b.add_argument("--shapes", default="cpu", choices=["cpu", "1b-xattn"])
    b.add_argument("--json", default=None, help="write the numbers to this file")
    b.add_argument("--device", default=None)
    b.set_defaults(fn=cmd_bench)

    dp = sub.add_parser("data", help="data tools").add_subparsers(dest="data_cmd", required=True).add_parser(
        "pack", help="write WebDataset tar shards from a JSONL manifest")
    dp.add_argument("manifest")
    dp.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar and index.json")
    dp.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    dp.add_argument("--skip-missing", action="store_true", help="pack the rest when media files are missing")
    dp.set_defaults(fn=cmd_data_pack)
    return p


def flush_subnormals() -> None:
    """Treat subnormal floats as 0 on this CPU (FTZ/DAZ), for every thread created after the
    call: threads inherit the floating-point mode of the one that starts them, so this runs
    before torch's first parallel region. An x86 CPU takes a slow path for each subnormal
    operand (a 64 x 49152 by 49152 x 576 product with half its left side subnormal: 3.4 s
    against 57 ms), and training produces them once a model grows confident (optimizer
    state, probabilities): the video demo's steps slowed from ~0.8 s to ~1.5 s partway.
    Values below 1.2e-38 become 0; nothing this library computes depends on them."""
    import torch

    torch.set_flush_denormal(True)


def main(argv: list[str] | None = None) -> int:
    flush_subnormals()
    _quiet()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides given after options: `mm train X.yaml --no-progress a.b=1`
        if args.cmd == "train" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args) or 0
    except KeyboardInterrupt:
        print("mm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"mm: error: {str(msg).splitlines()[0] if str(msg) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
