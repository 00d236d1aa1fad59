"""The optimizer step of each demo stage's trainable set: PyTorch's default AdamW (a loop of
small ops per tensor on CPU) against the fused kernel the training loop uses (mm.train.adamw).

    python3 scripts/optimizer_step_ab.py

Builds each stage's model from its config (no weights loaded: the step's cost does not depend
on them), gives every trainable tensor a random gradient, and alternates the two optimizers,
printing the median of 15 steps each.
"""

from __future__ import annotations

import statistics
import time

import torch

from mm.demo import demo_config
from mm.objectives import get_objective
from mm.runs import build_model
from mm.train import adamw
from mm.trainable import set_trainable

STAGES = ("image_encoder_pretrain", "image_adapter_pretrain", "image_anneal", "video_adapter", "speech_adapter")


def main() -> None:
    torch.set_num_threads(2)
    for stage in STAGES:
        cfg = demo_config(stage, ["init_from=null", f"out=/tmp/optimizer_step_ab/{stage}"])
        model, llm, types = build_model(cfg.model)
        set_trainable(model, cfg.trainable)
        objective = get_objective(cfg.objective)(cfg, model, types, llm.tokenizer)
        params = [p for p in model.parameters() if p.requires_grad] + list(objective.modules.parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opts = {fused: adamw(params, fused=fused, lr=1e-4, weight_decay=0.01) for fused in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(16):
            for fused, opt in opts.items():
                t = time.perf_counter()
                opt.step()
                times[fused].append(time.perf_counter() - t)
        med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
        print(f"{stage}: {sum(p.numel() for p in params) / 1e6:.2f}M values, default {med[False]:.1f} ms, "
              f"fused {med[True]:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
