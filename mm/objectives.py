"""Training objectives. A stage picks one by name in its YAML (``objective:``).

Each objective turns a step number into a batch (deterministically, so resuming needs only
the step) and a batch into a loss. Extra trainable modules that exist only for training (a
CLIP text tower, BEST-RQ heads) live in ``objective.modules`` and are checkpointed with it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from mm.config import ConfigError, RunConfig
from mm.data import SampleStream, collate, make_sample


class LMObjective:
    """Next-token loss on the answer tokens, LLM frozen (adapter training and SFT)."""

    def __init__(self, cfg: RunConfig, model, types: dict, tokenizer):
        from mm.distributed import Dist
        self.dist = Dist()  # set by the training loop under torchrun
        self.cfg = cfg
        self.model = model
        self.types = types
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.modules = nn.ModuleDict()
        make = partial(make_sample, model=model, types=types, tokenizer=tokenizer, preprocess=cfg.data.preprocess)
        self.stream = SampleStream.from_config(cfg, types, make)
        self.media_keys = bool(cfg.feature_cache)  # content keys for the modalities' feature caches

    def batch(self, step: int):
        return collate(self.stream.batch(step, self.cfg.optim.batch_size), types=self.types, pad_id=self.pad_id,
                       media_keys=self.media_keys)

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        """Mean over the labelled tokens of the *global* batch: each process divides its sum
        by the global count (and multiplies by the world size, since FSDP averages
        gradients), so any number of processes gives the single-process gradient."""
        from mm.distributed import all_sum
        d = self.dist
        total, count = self.model.loss(batch.input_ids, batch.labels, attention_mask=batch.attention_mask,
                                       media=batch.media, reduction="sum")
        n = all_sum(torch.tensor(float(count), device=total.device), d).clamp(min=1)
        report = (all_sum(total.detach().float(), d) / n).item()
        return total / n * d.world, {"tokens": int(batch.attention_mask.sum()), "samples": batch.input_ids.shape[0],
                                     "loss": report}


class ContrastiveObjective:
    """CLIP pre-training of an image encoder's ViT on image-text pairs (open_clip's loss).

    The text tower is a small open_clip text transformer that exists only for this stage.
    ``extra``: ``modality`` (default image), ``embed_dim``, ``text_width``, ``text_layers``.
    """

    def __init__(self, cfg: RunConfig, model, types: dict, tokenizer):
        import open_clip
        from open_clip.model import CLIPTextCfg, _build_text_tower

        check_extra(cfg, ("modality", "embed_dim", "text_width", "text_layers", "context_length"), "contrastive")
        self.cfg = cfg
        ex = cfg.extra
        self.name = ex.get("modality", "image")
        self.type = types[self.name]
        self.mod = model.modalities[self.name]
        self.vit = self.mod.encoder.vit
        width = self.vit.transformer.width
        dim = int(ex.get("embed_dim", 64))
        text = _build_text_tower(dim, CLIPTextCfg(context_length=int(ex.get("context_length", 16)),
                                                  width=int(ex.get("text_width", 64)), heads=4,
                                                  layers=int(ex.get("text_layers", 2))))
        self.modules = nn.ModuleDict({
            "text": text,
            "image_proj": nn.Linear(width, dim, bias=False),
            "logit_scale": _Scalar(torch.log(torch.tensor(1 / 0.07))),
        })
        self.context_length = text.context_length
        self.tokenize = open_clip.get_tokenizer("ViT-B-32")
        self._token_memo: dict[str, torch.Tensor] = {}
        self.clip_loss = open_clip.ClipLoss()
        make = self._make
        self.stream = SampleStream.from_config(cfg, types, make)

    def _make(self, rec):
        from mm.data import BadSample, _paths
        if "_error" in rec:
            raise BadSample(rec["_error"])
        paths = _paths(rec, self.name)
        text = rec.get("text")
        if not paths or not isinstance(text, str) or not text.strip():
            raise BadSample(f"{rec.get('_where', 'record')}: needs a {self.name} and a non-empty 'text'")
        try:
            item = self.type.preprocess(self.type.read(paths[0]), self.mod,
                                        **{"max_tiles": 1, **self.cfg.data.preprocess.get(self.name, {})})
        except ValueError as e:
            raise BadSample(str(e).splitlines()[0]) from None
        return item, text

    def batch(self, step: int):
        items = self.stream.batch(step, self.cfg.optim.batch_size)
        pixels = torch.stack([it["pixels"][0] for it, _ in items])  # first tile, (b, 3, s, s)
        tokens = torch.stack([self._tokens(t) for _, t in items])
        return pixels, tokens

    def _tokens(self, text: str) -> torch.Tensor:
        # open_clip's tokenizer (ftfy, regex) costs ~0.2 ms a caption; captions repeat
        if text not in self._token_memo:
            if len(self._token_memo) >= 100_000:
                self._token_memo.clear()
            self._token_memo[text] = self.tokenize([text])[0, : self.context_length]
        return self._token_memo[text]

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        pixels, tokens = batch
        pooled = self.vit(pixels)  # (b, w)
        img = nn.functional.normalize(self.modules["image_proj"](pooled), dim=-1)
        txt = nn.functional.normalize(self.modules["text"](tokens), dim=-1)
        scale = self.modules["logit_scale"].value.exp().clamp(max=100)
        loss = self.clip_loss(img, txt, scale)
        with torch.no_grad():
            acc = ((img @ txt.T).argmax(-1) == torch.arange(len(img))).float().mean().item()
        return loss, {"samples": len(img), "retrieval_acc": acc}


def check_extra(cfg: RunConfig, known, objective: str) -> None:
    """The stage's ``extra`` options must be ones ``objective`` reads: a misspelt option
    (``phone_ctcc: 1.0``) would otherwise be ignored without a word. Objectives that read
    ``extra`` call this first; ``lm`` reads none and leaves it free for the user's notes."""
    unknown = sorted(set(cfg.extra) - set(known))
    if unknown:
        raise ConfigError(f"{cfg.origin}: extra: unknown option {', '.join(map(repr, unknown))} for the "
                          f"{objective} objective (known: {', '.join(sorted(known))})")


class _Scalar(nn.Module):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(value.clone())


OBJECTIVES = {"lm": LMObjective, "contrastive": ContrastiveObjective}


def register_objective(name: str, cls) -> None:
    OBJECTIVES[name] = cls


def get_objective(name: str):
    if name not in OBJECTIVES:
        try:
            import mm.modalities.speech  # noqa: F401  (registers best_rq when speech is installed)
        except ImportError:
            pass
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; choose one of {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]
