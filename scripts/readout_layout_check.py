"""Text-only check of the speech read-out's layout: what the frozen SmolLM2 answers when a
spoken question reaches it as the demo's read-out would present a *perfect* transcript
(boundary B0, the question's CTC tokens, k blank " " embeddings, boundary B1), against its
answer to the question as text; and how it repeats 80 training-pattern sentences after the
ASR prompt in the same layout (WER). No audio, no trained model: the upper bound that the
layout alone leaves (docs/EXPERIMENTS.md, eleventh session).

    PLACE=after python3 scripts/readout_layout_check.py 'B0|B1|K[|ASR prompt with {m}[|lead[|tasks]]]' ...

B0, B1: one-token texts (\n for a newline, NONE for no boundary row); K: a blank count, or a
float for that many blanks per token (the demo's read-out gives ~1.5 per token); lead: the
text before the first word (default " ", as the CTC targets; NOLEAD for none); tasks: qa,asr.
PLACE: where the blanks go: after (the demo's: tokens, blanks, B1), before (B0, blanks,
tokens), outside (after B1), first (before B0).
"""
import ast
import os
import sys

import torch

torch.set_num_threads(2); torch.set_flush_denormal(True)
from mm.runs import get_llm
from mm.config import ModelConfig
from mm.prompts import render, mark, end_of_turn_id
from mm.speech import questions, _split_of, answer_questions, sentences, first_line, unquote, word_error_rate, answer_is_correct
from mm.modalities.speech import ASR_PROMPT
from mm.infer import exact_match
fz = get_llm(ModelConfig(llm="smollm2")); tok = fz.tokenizer; lm = fz.model.eval()
E = lm.get_input_embeddings().weight.detach()
ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]
def one(t):
    i = ids(t); assert len(i) == 1, (t, i); return i[0]
BL = one(" ")
qs = [q for q in questions() if _split_of(q, 0.2) == "train"]
kept = answer_questions(qs)
qa = kept  # training-split questions only
sents = sentences(80, seed=12345)
eos = end_of_turn_id(tok)

def build(prompt, words, b0, b1, k, lead=" "):
    text = render(tok, prompt if mark("audio") in prompt else prompt + mark("audio"))
    pre, post = text.split(mark("audio"))
    t = [x for x in ids(lead + words.strip()) if x != BL]
    nb = int(k * len(t)) if isinstance(k, float) else k
    B = [E[[BL] * nb]]; B0 = [b0[None]] if b0 is not None else []; B1 = [b1[None]] if b1 is not None else []
    order = {"after": B0 + [E[t]] + B + B1, "before": B0 + B + [E[t]] + B1, "outside": B0 + [E[t]] + B1 + B,
             "first": B + B0 + [E[t]] + B1}[PLACE]
    rows = [E[ids(pre)]] + order + [E[ids(post)]]
    return torch.cat(rows)

@torch.no_grad()
def gen(embs, n=32, bs=32):
    out = []
    for i in range(0, len(embs), bs):
        part = embs[i:i + bs]; L = max(e.shape[0] for e in part)
        x = torch.zeros(len(part), L, E.shape[1]); m = torch.zeros(len(part), L, dtype=torch.long)
        for j, e in enumerate(part):
            x[j, L - e.shape[0]:] = e; m[j, L - e.shape[0]:] = 1
        g = lm.generate(inputs_embeds=x, attention_mask=m, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        out += [tok.decode(r, skip_special_tokens=True) for r in g]
    return out

def emb_of(s):
    return None if s is None else E[one(s)]


PLACE = os.environ.get("PLACE", "after")
for spec in sys.argv[1:]:
    # spec: b0|b1|k|asr prompt (with {m} for the speech)|lead|tasks
    f = spec.split("|")
    b0s, b1s, k = f[0], f[1], ast.literal_eval(f[2])
    asrp = f[3] if len(f) > 3 and f[3] else ASR_PROMPT.format(language="English") + "{m}"
    lead = ("" if f[4] == "NOLEAD" else (f[4] or " ")) if len(f) > 4 else " "
    tasks = f[5] if len(f) > 5 else "qa,asr"
    dec = lambda v: None if v == "NONE" else v.replace("\\n", "\n")
    b0, b1 = emb_of(dec(b0s)), emb_of(dec(b1s))
    msg = f"{spec!r:60s}"
    if "qa" in tasks:
        qa_out = gen([build("", r["question"], b0, b1, k, lead) for r in qa])
        agree = sum(exact_match(o, r["answer"]) for o, r in zip(qa_out, qa)) / len(qa)
        right = sum(bool(answer_is_correct(r["question"], o)) for o, r in zip(qa_out, qa)) / len(qa)
        msg += f" qa_exact {agree:.3f} qa_right {right:.3f}"
    if "asr" in tasks:
        pre, post = dec(asrp).split("{m}")
        embs = []
        for s_ in sents:
            e = build(pre + mark("audio") + post, s_, b0, b1, k, lead)
            embs.append(e)
        asr_out = gen(embs, n=20)
        wer = word_error_rate(sents, [unquote(first_line(o)) for o in asr_out])
        msg += f" asr_wer {wer:.3f}"
    print(msg, flush=True)
