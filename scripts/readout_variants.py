"""Score a trained speech run's eval sources (WER, spoken-QA agreement) with the read-out's
blank frames handled another way than the demo's (docs/EXPERIMENTS.md, eleventh session):

    python3 scripts/readout_variants.py RUN VARIANT [batch_size]

VARIANT: base (the demo's: tokens, then every blank frame as " ", then the end boundary);
drop (no blank frames); keepN (at most N blank frames); first (the blanks before the begin
boundary); fill:TEXT (blank frames read as TEXT's one token, \n for a newline; fill:ZERO a
zero vector). Nothing is trained; the same frames, another layout.
"""
import sys, json, torch
torch.set_num_threads(2)
import mm.modality as M
from mm.runs import load_run
from mm.speech import evaluate_speech
var = sys.argv[2]; bs = int(sys.argv[3]) if len(sys.argv) > 3 else 32

def embed(self, feats, mask, vocab=None):
    emb, emask = self.adapter(feats, mask)
    if self.readout_blank is not None:
        idx = M.ctc_repeats_blank(M.nearest_tokens(emb, vocab), self.readout_blank)
        emb = M.vocabulary_readout(emb, emask, vocab, self.readout_blank)
        if var in ("drop", "drop_strip") or var.startswith("keep"):
            keep = ((idx != self.readout_blank) & emask).sum(-1)  # tokens come first after the sort
            if var.startswith("keep"):
                keep = torch.minimum(keep + int(var[4:]), emask.sum(-1))
            emask = torch.arange(emask.shape[1])[None] < keep[:, None]
            emb = emb * emask[..., None]
        if var.startswith("fill:"):
            f = var[5:]
            ntok = ((idx != self.readout_blank) & emask).sum(-1)
            pos = torch.arange(emask.shape[1])[None]
            isb = (pos >= ntok[:, None]) & emask
            if f == "ZERO":
                row = torch.zeros(emb.shape[-1])
            else:
                t = TOK(f.replace("\\n", "\n"), add_special_tokens=False)["input_ids"]; assert len(t) == 1, t
                row = vocab[t[0]]
            emb = torch.where(isb[..., None], row.to(emb.dtype), emb)
        if var == "first":
            b, m2, d = emb.shape
            ntok = ((idx != self.readout_blank) & emask).sum(-1)
            lengths = emask.sum(-1)
            out = emb.new_zeros(b, m2 + 2, d)
            blank_row = vocab[self.readout_blank].to(emb.dtype)
            for r in range(b):
                nb = int(lengths[r] - ntok[r]); nt = int(ntok[r])
                out[r, :nb] = blank_row
                out[r, nb] = self.boundary[0]
                out[r, nb + 1:nb + 1 + nt] = emb[r, :nt]
                out[r, nb + 1 + nt] = self.boundary[1]
            omask = torch.arange(m2 + 2, device=emb.device)[None] < (lengths + 2)[:, None]
            return out, omask
    b, m2, d = emb.shape
    out = emb.new_zeros(b, m2 + 2, d)
    lengths = emask.sum(-1)
    out[:, 0] = self.boundary[0]
    out[:, 1:m2 + 1] = emb * emask[..., None]
    out[torch.arange(b), lengths + 1] = self.boundary[1].to(out.dtype)
    omask = torch.arange(m2 + 2, device=emb.device)[None] < (lengths + 2)[:, None]
    return out, omask
M.Modality.embed = embed
model, llm, types, cfg = load_run(sys.argv[1])
TOK = llm.tokenizer
res = evaluate_speech(model, types, llm.tokenizer, cfg.eval.sources, batch_size=bs, samples=0)
print(var, bs, {k: (v.get("wer"), v.get("qa_agreement"), v.get("answer_agreement")) for k, v in res.items()})
if len(sys.argv) > 4:
    res = evaluate_speech(model, types, llm.tokenizer, [s for s in cfg.eval.sources if s.get("task") == "asr"], batch_size=bs, samples=20)
    for s in next(iter(res.values()))["samples"]: print(s)
