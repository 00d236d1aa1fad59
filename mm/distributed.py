"""Multi-GPU / multi-node training with torchrun and PyTorch FSDP2 (``fully_shard``).

Launch with ``torchrun --nproc_per_node 8 -m mm.cli train CONFIG.yaml`` (one node) or with
``--nnodes N --node_rank R --rdzv_endpoint HOST:PORT`` (several). Without torchrun everything
runs in one process and nothing here does anything.

- Every trainable block (cross-attention layers, encoder blocks, adapters) is its own FSDP2
  unit; FSDP2 handles frozen and trainable parameters in one unit, unlike FSDP1.
- The frozen LLM's decoder layers are sharded (``distributed.llm: shard``) or replicated on
  every rank (``replicate``: no all-gathers for it; it must fit on one device). Embeddings,
  final norm and head are always whole on every rank (frozen: nothing to synchronise).
- bf16 mixed precision (``distributed.mixed_precision: bf16``): parameters cast to bf16 for
  compute, gradients reduced in fp32.
- Activation checkpointing, non-reentrant, chosen per block type (``distributed.checkpointing``:
  any of ``llm``, ``xattn``, ``encoder``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Dist:
    """Join the process group started by torchrun (env RANK/WORLD_SIZE), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        if dev.index is None:  # "cuda": this process's GPU (set_device needs an index)
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        x = x.clone()
        dist.all_reduce(x)
    return x


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def enable_checkpointing(model, kinds: list[str]) -> None:
    """Non-reentrant activation checkpointing for the chosen block types (names unchanged)."""
    unknown = set(kinds) - {"llm", "xattn", "encoder"}
    if unknown:
        raise ValueError(f"distributed.checkpointing: unknown block types {sorted(unknown)} (llm, xattn, encoder)")
    if "llm" in kinds:
        # transformers' own mechanism; it runs only on layers in training mode, so the decoder
        # layers (not their attention/dropout children) are marked as training.
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.llm.eval()
        for layer in model.layers:
            layer.training = True
        model.share_prefix = False  # the prefix KV cache is not replayable under recompute
    if "xattn" in kinds:
        model.checkpoint_xattn = True
    if "encoder" in kinds:
        for mod in model.modalities.values():
            for m in mod.encoder.modules():
                if hasattr(m, "set_grad_checkpointing"):
                    m.set_grad_checkpointing(True)


def shard(model, objective_modules: nn.Module, *, llm: str = "shard", mixed_precision: str = "bf16") -> None:
    """Apply FSDP2 to the model in place (block by block, then the root)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    if llm not in ("shard", "replicate"):
        raise ValueError(f"distributed.llm must be shard or replicate, not {llm!r}")
    for mod in model.modalities.values():
        for block in getattr(mod, "xattn", {}).values():
            fully_shard(block, mp_policy=mp)
            register_fsdp_forward_method(block, "project_kv")  # called outside forward
        for m in mod.encoder.modules():
            for name in ("resblocks", "blocks", "layers"):
                seq = getattr(m, name, None)
                if isinstance(seq, nn.ModuleList) and any(p.requires_grad for p in seq.parameters()):
                    for blk in seq:
                        fully_shard(blk, mp_policy=mp)
        fully_shard(mod, mp_policy=mp)
        for method in ("encode", "embed"):
            register_fsdp_forward_method(mod, method)
    if llm == "shard":
        # decoder layers only: embeddings, final norm and (tied) head stay whole on every
        # rank; they are frozen, so nothing has to be synchronised for them
        for layer in model.layers:
            fully_shard(layer, mp_policy=mp)
    if any(True for _ in objective_modules.parameters()):
        fully_shard(objective_modules, mp_policy=mp)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter's full value (gathers a sharded DTensor; a collective on every rank)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
