"""Synthetic 3-axis accelerometer recordings (50 Hz) of four activities.

Each recording is gravity plus an activity-specific motion, at a random speed, amplitude
and noise level, seen through a random device orientation, so that no single axis or
sample gives the answer away.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RATE = 50
ACTIVITIES = ("walking", "running", "sitting", "jumping")


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def recording(activity: str, rng: np.random.Generator, seconds: float = 4.0) -> np.ndarray:
    """(samples, 3) float32 in g."""
    t = np.arange(int(seconds * RATE)) / RATE
    phase = rng.uniform(0, 2 * np.pi)
    body = np.zeros((len(t), 3))
    if activity == "walking":
        f = rng.uniform(1.6, 2.2)
        body[:, 2] = rng.uniform(0.2, 0.4) * np.sin(2 * np.pi * f * t + phase)
        body[:, 0] = rng.uniform(0.1, 0.2) * np.sin(np.pi * f * t + phase)
    elif activity == "running":
        f = rng.uniform(2.6, 3.4)
        body[:, 2] = rng.uniform(0.8, 1.3) * np.sin(2 * np.pi * f * t + phase)
        body[:, 0] = rng.uniform(0.3, 0.5) * np.sin(np.pi * f * t + phase)
    elif activity == "sitting":
        body += rng.normal(0, 0.02, size=body.shape).cumsum(0) * 0.05
    elif activity == "jumping":
        f = rng.uniform(0.8, 1.3)
        s = np.sin(2 * np.pi * f * t + phase)
        body[:, 2] = rng.uniform(1.5, 2.5) * np.clip(s, 0, None) ** 4 - 0.3 * (s < 0)
    else:
        raise ValueError(f"unknown activity {activity!r}")
    x = body + np.array([0.0, 0.0, 1.0])  # gravity
    x = x @ _rotation(rng).T
    x += rng.normal(0, rng.uniform(0.02, 0.08), size=x.shape)
    return x.astype(np.float32)


def make_dataset(out_dir: str | Path, *, n: int, seed: int, split: str = "train", fmt: str = "npy") -> Path:
    """Write ``n`` recordings (``.npy`` or ``.csv``) and a manifest; returns its path."""
    out = Path(out_dir)
    (out / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}.get(split, 2)])
    rows = []
    for i in range(n):
        act = ACTIVITIES[i % len(ACTIVITIES)]
        x = recording(act, rng, seconds=float(rng.uniform(3.0, 5.0)))
        name = f"{split}/{i:05d}.{fmt}"
        if fmt == "npy":
            np.save(out / name, x)
        else:
            np.savetxt(out / name, x, delimiter=",", header="x,y,z", comments="", fmt="%.5f")
        rows.append({"accel": name, "question": "What is the person doing?", "text": f"the person is {act}",
                     "task": "activity"})
    manifest = out / f"{split}.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest
