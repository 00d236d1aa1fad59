"""Where does a video run lose the direction of motion? Linear probes on held-out clips.

Fits a linear classifier of the moving-shapes direction (left/right/up/down) on the train
clips and scores it on the eval clips, twice: on the frame tokens that go into the temporal
aggregator (first and last frame, concatenated) and on the aggregator's output tokens:

    python3 scripts/video_direction_probe.py RUN/video/video_adapter
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from mm.data import collate, load_source, make_sample
from mm.runs import load_run

DIRECTIONS = ["left", "right", "up", "down"]


def features(model, types, tokenizer, cfg, sources, name="video"):
    mod = model.modalities[name]
    recs = [r for s in sources for r in load_source(s, types)]
    frames, pooled, labels = [], [], []
    for k in range(0, len(recs), 32):
        chunk = recs[k:k + 32]
        batch = collate([make_sample(r, model=model, types=types, tokenizer=tokenizer,
                                     preprocess=cfg.data.preprocess, train=False) for r in chunk],
                        types=types, pad_id=0)
        seen = {}
        hook = mod.encoder.aggregator.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        try:
            with torch.no_grad():
                out, _ = mod.encode(batch.media[name].inputs)  # (b, tokens, d)
        finally:
            hook.remove()
        x = seen["x"]  # (b, f, n, d): the frame tokens the aggregator receives
        frames.append(torch.cat([x[:, 0], x[:, -1]], -1).flatten(1))
        pooled.append(out.flatten(1))
        labels += [DIRECTIONS.index(r["text"].split()[-1]) for r in chunk]
    return torch.cat(frames), torch.cat(pooled), torch.tensor(labels)


def probe(xtr, ytr, xte, yte, steps: int = 300) -> tuple[float, float]:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-5
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(xtr.shape[1], len(DIRECTIONS), requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(xtr @ w, ytr).backward()
        opt.step()
    with torch.no_grad():
        return (((xtr @ w).argmax(1) == ytr).float().mean().item(),
                ((xte @ w).argmax(1) == yte).float().mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a video run (e.g. RUN/video/video_adapter)")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, llm, types, cfg = load_run(a.run)
    model.eval()
    tr = features(model, types, llm.tokenizer, cfg, cfg.data.sources)
    te = features(model, types, llm.tokenizer, cfg, cfg.eval.sources)
    for i, what in enumerate(("frame tokens (first + last frame)", "aggregator output")):
        fit, held = probe(tr[i], tr[2], te[i], te[2])
        print(f"direction from the {what}: train {fit:.3f}, held out {held:.3f} (chance 0.25)")


if __name__ == "__main__":
    main()
