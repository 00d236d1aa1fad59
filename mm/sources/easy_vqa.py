"""easy-VQA (the PyPI package ``easy-vqa``, MIT): 64x64 images of one coloured shape with
questions and answers. Captions ("a red circle") are derived from each image's answers."""

from __future__ import annotations

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


SPLITS = ("train", "test", "fit", "val")


def _load(split: str):
    """``fit`` and ``val`` cut ``train`` by image: every 10th image (id % 10 == 0) is ``val``,
    the rest ``fit``, so settings can be compared without looking at ``test``."""
    import easy_vqa
    if split not in SPLITS:
        raise ValueError(f"easy-vqa: split must be one of {', '.join(SPLITS)}, not {split!r}")
    base = "test" if split == "test" else "train"
    qs, answers, ids = easy_vqa.get_train_questions() if base == "train" else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if base == "train" else easy_vqa.get_test_image_paths()
    if split in ("fit", "val"):
        keep = [(i % 10 == 0) == (split == "val") for i in ids]
        qs, answers, ids = ([x for x, k in zip(col, keep) if k] for col in (qs, answers, ids))
    return qs, answers, ids, paths


def captions(split: str) -> dict[int, str]:
    """image id -> "a {color} {shape}", from the answers of its questions."""
    qs, answers, ids, _ = _load(split)
    color, shape = {}, {}
    for q, a, i in zip(qs, answers, ids):
        if a in COLORS and "color" in q:
            color[i] = a
        elif a in SHAPES and ("what shape" in q or q.startswith("what is the")):
            shape[i] = a
    return {i: f"a {color[i]} {shape[i]}" for i in sorted(set(color) & set(shape))}


def records(split: str = "train", *, task: str = "caption", prompt: str = "Describe the image.",
            limit: int = 0, seed: int = 0, answers: list[str] | None = None) -> list[dict]:
    """Records for the data pipeline: ``task`` is ``caption`` or ``vqa``; ``answers`` keeps
    only the questions with those answers (e.g. ``[yes, no]``)."""
    qs, ans, ids, paths = _load(split)
    if task == "caption":
        out = [{"image": paths[i], "question": prompt, "text": c, "task": "caption"}
               for i, c in captions(split).items()]
    elif task == "vqa":
        out = [{"image": paths[i], "question": q, "text": a, "task": "vqa"} for q, a, i in zip(qs, ans, ids)]
    else:
        raise ValueError(f"easy-vqa: task must be caption or vqa, not {task!r}")
    if answers is not None:
        keep = {answers} if isinstance(answers, str) else set(answers)  # "answers: yes" is one answer
        out = [r for r in out if r["text"] in keep]
        if not out:
            raise ValueError(f"easy-vqa {split} {task}: answers {sorted(keep)} keep no record")
    if limit and limit < len(out):
        import random
        out = random.Random(seed).sample(out, limit)
    return out
