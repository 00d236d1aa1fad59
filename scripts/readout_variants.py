"""Score a trained speech run's eval sources (WER, spoken-QA agreement) with the read-out's
blank frames handled another way than the demo's (docs/EXPERIMENTS.md, eleventh session):

    python3 scripts/readout_variants.py RUN VARIANT [batch_size]

VARIANT: base (the run's own read-out: tokens, then every blank frame as " ", then the end
boundary, unless its config says otherwise); drop (no blank frames); keepN (at most N blank
frames); first (the blanks before the begin boundary); fill:TEXT (blank frames read as TEXT's
one token, \n for a newline; fill:ZERO a zero vector); prompted (the library's
``readout_blanks: prompted``: blank frames after a text prompt only). Nothing is trained; the
same frames, another layout. Placeholder columns a variant leaves unused are masked out of
attention (mm.model.mask_unused_placeholders); before the twelfth session they stayed in the
prompt as pad tokens, which the EXPERIMENTS rows of the eleventh session measured.
"""
import sys, json, torch
torch.set_num_threads(2)
import mm.modality as M
from mm.runs import load_run
from mm.speech import evaluate_speech
var = sys.argv[2]; bs = int(sys.argv[3]) if len(sys.argv) > 3 else 32

_readout, _embed = M.vocabulary_readout, M.Modality.embed
_counts = {}  # per call: each row's token frames and valid frames, for "first"


def readout(emb, mask, vocab, blank):
    """The demo's read-out, then the variant; keepN shortens ``mask`` in place, which the
    Modality.embed calling this uses for where the end boundary goes."""
    out, read = _readout(emb, mask, vocab, blank)  # tokens first, then blanks, then padding: rows of vocab
    ntok = read.sum(-1)
    _counts["ntok"], _counts["valid"] = ntok, mask.sum(-1)
    if var.startswith("keep"):
        keep = torch.minimum(ntok + int(var[4:]), mask.sum(-1))
        mask &= torch.arange(mask.shape[1])[None] < keep[:, None]
        out = out * mask[..., None]
    elif var.startswith("fill:"):
        f = var[5:]
        isb = (torch.arange(mask.shape[1])[None] >= ntok[:, None]) & mask
        if f == "ZERO":
            row = torch.zeros(out.shape[-1])
        else:
            t = TOK(f.replace("\\n", "\n"), add_special_tokens=False)["input_ids"]
            assert len(t) == 1, t
            row = vocab[t[0]]
        out = torch.where(isb[..., None], row.to(out.dtype), out)
    return out, read


def embed(self, feats, mask, vocab=None, prompted=None):
    out, omask, width = _embed(self, feats, mask, vocab, prompted)  # [begin, tokens, blanks, end]
    if var == "first":  # [blanks, begin, tokens, end]
        out = out.clone()
        for r, (nt, n) in enumerate(zip(_counts["ntok"].tolist(), _counts["valid"].tolist())):
            row = out[r, :n + 2].clone()
            nb = n - nt
            out[r, :nb] = row[1 + nt:1 + n]
            out[r, nb:nb + 1 + nt] = row[:1 + nt]
            out[r, nb + 1 + nt] = row[n + 1]
    return out, omask, width


M.vocabulary_readout = readout
M.Modality.embed = embed
model, llm, types, cfg = load_run(sys.argv[1])
if var in ("drop", "prompted"):  # the library's own options
    next(m for m in model.modalities.values() if m.kind == "tokens").readout_blanks = var
TOK = llm.tokenizer
res = evaluate_speech(model, types, llm.tokenizer, cfg.eval.sources, batch_size=bs, samples=0)
print(var, bs, {k: (v.get("wer"), v.get("qa_agreement"), v.get("answer_agreement")) for k, v in res.items()})
if len(sys.argv) > 4:
    res = evaluate_speech(model, types, llm.tokenizer, [s for s in cfg.eval.sources if s.get("task") == "asr"], batch_size=bs, samples=20)
    for s in next(iter(res.values()))["samples"]: print(s)
