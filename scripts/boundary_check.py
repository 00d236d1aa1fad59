"""How the frozen LLM reads a speech slot between candidate boundary tokens (`boundary_init`).

With the vocabulary read-out (`readout: {blank: ...}`) the LLM sees, between the two boundary
embeddings, real token embeddings: the transcript's tokens followed by blanks. This script
puts the *reference* tokens there (or a trained run's read-out, with ``--run``) between two
candidate boundary tokens and reports:

- ``ref WER``: what the LLM writes for the ASR prompt with the reference transcript's tokens
  and a blank tail (the read-out's best case);
- ``read-out WER`` (with ``--run``): the same with the run's own read-out of the audio;
- ``QA``: how often the answer to a spoken question's reference tokens equals the LLM's
  answer to the same question in text, over the training split's questions.

Usage (from the repository root; the run's eval sources name the ASR utterances):

    python3 scripts/boundary_check.py --run RUN_DIR --source 0 '\\n' '“|"' "'|\\n"

A candidate is one token for both boundaries or ``BEGIN|END``; ``\\n`` stands for a newline.
Generation is greedy and batched (left padding), 24 new tokens, the reply's first line kept,
as `mm.speech.transcribe_waves` keeps it.
"""

from __future__ import annotations

import argparse
import random

import torch


def _readouts(run: str, source: int) -> tuple[list[dict], object, object, str]:
    """Each utterance of the run's eval source ``source``: reference text, read-out ids and
    the number of blank frames (as `mm.modality.vocabulary_readout` lays them out); also the
    frozen LLM, the read-out's blank id and the run's LLM spec."""
    from mm.data import _paths, load_source
    from mm.modalities.speech import collate, preprocess, read
    from mm.modality import ctc_repeats_blank, nearest_tokens
    from mm.runs import load_run
    from mm.speech import speech_modality_name

    model, frozen, types, cfg = load_run(run)
    name = speech_modality_name(types)
    mod = model.modalities[name]
    vocab = model.llm.get_input_embeddings().weight.detach()
    src = dict(cfg.eval.sources[source])
    src.pop("name", None)
    out = []
    with torch.no_grad():
        for rec in load_source(src, types):
            if "_error" in rec:
                continue
            item = preprocess(read(_paths(rec, name)[0]), mod)
            feats, mask = mod.encode(collate([item]))
            emb, emask = mod.adapter(feats, mask)
            idx = ctc_repeats_blank(nearest_tokens(emb, vocab)[:, emask[0]], mod.readout_blank)[0].tolist()
            ids = [t for t in idx if t != mod.readout_blank]
            out.append({"ref": rec.get("spoken") or rec["text"], "ids": ids, "blanks": len(idx) - len(ids)})
    return out, frozen, mod.readout_blank, cfg.model.llm


def main() -> None:
    from mm.infer import normalize
    from mm.modalities.speech import ASR_PROMPT
    from mm.prompts import mark, render
    from mm.speech import _texts, first_line, word_error_rate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a speech_adapter run directory (its eval sources, its read-out)")
    ap.add_argument("--source", type=int, default=0, help="index of an ASR source in the run's eval sources")
    ap.add_argument("--no-readout", action="store_true", help="reference tokens only")
    ap.add_argument("candidates", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(2)

    utts, frozen, blank, llm_spec = _readouts(args.run, args.source)
    tok, lm = frozen.tokenizer, frozen.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    r = random.Random(0)
    trained = _texts("qa", n=0, seed=0, split="train", eval_fraction=0.2, llm=llm_spec, max_answer_tokens=20)
    qa = [{"ref": q, "target": a, "blanks": r.choice([u["blanks"] for u in utts])} for q, a in trained]

    def one(text: str) -> int:
        ids = tok(text.replace("\\n", "\n"), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise SystemExit(f"{text!r} is {len(ids)} tokens, not one")
        return ids[0]

    def around(prompt: str) -> tuple[list[int], list[int]]:
        before, after = render(tok, prompt + mark("audio")).split(mark("audio"))
        return tok(before, add_special_tokens=False)["input_ids"], tok(after, add_special_tokens=False)["input_ids"]

    def generate(rows: list[list[int]]) -> list[str]:
        n = max(map(len, rows))
        ids = torch.tensor([[pad] * (n - len(x)) + x for x in rows])
        att = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in rows])
        out = []
        for i in range(0, len(rows), 32):
            g = lm.generate(ids[i:i + 32], attention_mask=att[i:i + 32], max_new_tokens=24, do_sample=False,
                            eos_token_id=tok.eos_token_id, pad_token_id=pad)
            out += [first_line(tok.decode(row[n:], skip_special_tokens=True)) for row in g]
        return out

    def ref_ids(u: dict) -> list[int]:
        return tok(" " + u["ref"], add_special_tokens=False)["input_ids"]

    asr_pre, asr_post = around(ASR_PROMPT.format(language="English"))
    qa_pre, qa_post = around("")
    refs = [u["ref"] for u in utts]
    if not args.no_readout:
        print(f"read-out itself: WER {word_error_rate(refs, [tok.decode(u['ids']) for u in utts]):.4f}")
    for cand in args.candidates:
        b0, b1 = (one(t) for t in (cand.split("|") if "|" in cand else (cand, cand)))
        slot = lambda body, u: [b0] + body + [blank] * u["blanks"] + [b1]  # noqa: E731
        line = f"{cand!r:10} ref WER {word_error_rate(refs, generate([asr_pre + slot(ref_ids(u), u) + asr_post for u in utts])):.4f}"
        if not args.no_readout:
            hyp = generate([asr_pre + slot(u["ids"], u) + asr_post for u in utts])
            line += f"  read-out WER {word_error_rate(refs, hyp):.4f}"
        said = generate([qa_pre + slot(ref_ids(u), u) + qa_post for u in qa])
        agree = sum(normalize(s) == normalize(u["target"]) for s, u in zip(said, qa))
        print(f"{line}  QA {agree}/{len(qa)}", flush=True)


if __name__ == "__main__":
    main()
