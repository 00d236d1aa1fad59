"""Conformer with rotary self-attention (torchaudio's Conformer has no positional information).

Block (Gulati et al. 2020, Macaron style):
    x = x + 1/2 FFN(x);  x = x + MHSA(x);  x = x + Conv(x);  x = x + 1/2 FFN(x);  x = LN(x)
MHSA applies rotary position embedding to queries and keys and masks padded keys. The conv
module zeroes padded frames before its depthwise convolution and normalises with LayerNorm
(not BatchNorm), so a sample's output never depends on the rest of its batch.

Padded frames do no work: :class:`Conformer` runs its blocks on the valid frames alone, packed
as rows (n, d) (``index``: their flat positions in the (b * m) frames), and only attention and
the depthwise convolution, which need the time axis, see the padded (b, m, .) layout. Every
other op of a block is per frame. A speech batch is ~25-30% padding (utterances of mixed
length); on 2 CPU cores the tiny encoder's forward and backward at the demo's training shape
took ~17% less time than on the padded layout, and the demo's CTC step ~23% less, with the same
outputs up to float rounding (docs/PERFORMANCE_LOG.md).

Notation: b = batch, m = frames, d = width, h = heads, k = head width (d / h).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def rotary_tables(
    length: int, head_dim: int, *, base: float = 10_000.0, device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (m, k / 2) for positions 0..length-1 (RoFormer frequencies)."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head width, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq  # (m, k/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + k/2) of x (b, h, m, k) by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)  # (b, h, m, k/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def pack(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of x (b, m, c) flattened to (b * m, c): the valid frames, (n, c)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index)


def unpack(x: torch.Tensor, index: torch.Tensor, b: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (n, c) rows back to (b, m, c), zero at the other frames."""
    return x.new_zeros(b * m, x.shape[-1]).index_copy(0, index, x).view(b, m, x.shape[-1])


def valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat positions (n,) of the True frames of ``mask`` (b, m), in order."""
    return mask.reshape(-1).nonzero().squeeze(1)


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions and a key-padding mask (no norm inside).

    forward(x (b, m, d), mask (b, m) bool, True = valid) -> (b, m, d); with ``index`` (see
    :func:`pack`), x and the result are the valid frames only, (n, d).
    """

    def __init__(self, *, dim: int, num_heads: int, dropout: float = 0.0, rope_base: float = 10_000.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        if self.head_dim % 2:
            raise ValueError(f"head width dim / num_heads = {self.head_dim} must be even for rotary")
        self.dropout, self.rope_base = dropout, rope_base
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        b, m = mask.shape
        d = x.shape[-1]
        qkv = self.qkv(x) if index is None else unpack(self.qkv(x), index, b, m)  # (b, m, 3d)
        q, k, v = qkv.view(b, m, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (b, h, m, k) each
        cos, sin = rotary_tables(m, self.head_dim, base=self.rope_base, device=q.device, dtype=q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # A row with no valid key would give NaN; let it attend anywhere (its output is masked).
        keys = mask | ~mask.any(dim=-1, keepdim=True)  # (b, m)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keys[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )  # (b, h, m, k)
        y = y.transpose(1, 2).reshape(b, m, d)
        return self.out(y if index is None else pack(y, index))  # (b, m, d) or (n, d)


class FeedForward(nn.Module):
    """LayerNorm -> Linear -> SiLU -> Dropout -> Linear -> Dropout; (b, m, d) -> (b, m, d)."""

    def __init__(self, *, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def depthwise_conv(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv`` (a depthwise, stride-1 ``nn.Conv1d`` with odd kernel, 'same' padding) over the
    frames of x (b, m, d) -> (b, m, d).

    Runs as a 2D convolution with time as the height (b, d, m, 1): on a CPU oneDNN takes a slow
    path for the (b, d, 1, m) layout that ``nn.Conv1d`` uses: ~7x slower forward and ~4x
    backward at the tiny encoder's training shape (32, 144, 46) with kernel 15, where it took
    ~11% of a CTC step.
    Same parameters, same result up to float rounding. Other devices keep ``nn.Conv1d`` (not
    measured there).
    """
    if x.device.type != "cpu":
        return conv(x.transpose(1, 2)).transpose(1, 2)
    k = conv.kernel_size[0]
    y = F.conv2d(x.transpose(1, 2).contiguous().unsqueeze(-1), conv.weight.unsqueeze(-1), conv.bias,
                 padding=(k // 2, 0), groups=conv.groups)  # (b, d, m, 1)
    return y.squeeze(-1).transpose(1, 2)


class ConvModule(nn.Module):
    """LN -> pointwise (d -> 2d) -> GLU -> zero padding -> depthwise conv -> LN -> SiLU ->
    pointwise -> Dropout.

    forward(x (n, d), mask (b, m), index (n,)) -> (n, d): x and the result are the valid frames
    only (see :func:`pack`); the depthwise convolution alone runs on the padded (b, m, d)
    layout, zeros at the padding, so padding never leaks into valid frames.
    """

    def __init__(self, *, dim: int, kernel_size: int, dropout: float = 0.0):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"conv kernel_size must be odd ('same' padding), got {kernel_size}")
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv_norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.pointwise_in(self.norm(x)), dim=-1)  # (n, d)
        y = pack(depthwise_conv(unpack(y, index, *mask.shape), self.depthwise), index)  # (n, d)
        y = F.silu(self.conv_norm(y))
        return self.dropout(self.pointwise_out(y))  # (n, d)


class ConformerBlock(nn.Module):
    """One Macaron Conformer block; forward(x (b, m, d), mask (b, m)) -> (b, m, d), zero at
    padded frames. With ``index`` (see :func:`pack`), x and the result are the valid frames
    only, (n, d): :class:`Conformer` runs its blocks that way."""

    def __init__(self, *, ffn1: FeedForward, attn: RotarySelfAttention, conv: ConvModule,
                 ffn2: FeedForward, dim: int, dropout: float = 0.0):
        super().__init__()
        self.ffn1, self.attn, self.conv, self.ffn2 = ffn1, attn, conv, ffn2
        self.attn_norm = nn.LayerNorm(dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if index is None:
            index = valid_index(mask)
            return unpack(self(pack(x, index), mask, index), index, *mask.shape)  # padded frames zero
        x = x + 0.5 * self.ffn1(x)  # (n, d)
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), mask, index))
        x = x + self.conv(x, mask, index)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)


def scale_branch_outputs(block: ConformerBlock, scale: float) -> None:
    """Multiply the last layer of each residual branch of ``block`` (both FFNs' second Linear,
    the attention's output projection, the conv module's last pointwise Linear) by ``scale``,
    weights and biases. ``scale=0`` makes the block start as its final LayerNorm alone (as
    zero-initialised residual branches in ResNets, Fixup and GPT-2's scaled init): the
    encoder then starts as a normalised linear projection of the stacked features, and every
    branch grows from zero. Draws no random numbers, so the other weights stay as seeded."""
    with torch.no_grad():
        for layer in (block.ffn1.net[-2], block.attn.out, block.conv.pointwise_out, block.ffn2.net[-2]):
            layer.weight.mul_(scale)
            layer.bias.mul_(scale)


class Conformer(nn.Module):
    """A stack of Conformer blocks.

    forward(x (b, m, d), mask (b, m) bool, True = valid) -> (b, m, d), zero at padded frames.
    Set `activation_checkpointing` to recompute blocks in backward (non-reentrant).
    """

    def __init__(self, blocks: list[ConformerBlock], *, activation_checkpointing: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
            raise ValueError(f"mask must be bool {tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
        index = valid_index(mask)
        h = pack(x, index)  # (n, d): the valid frames
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, mask, index, use_reentrant=False)
            else:
                h = block(h, mask, index)  # (n, d)
        return unpack(h, index, *mask.shape)  # (b, m, d)


def conformer_block(
    *, dim: int, num_heads: int, ffn_dim: int, kernel_size: int, dropout: float = 0.0,
    rope_base: float = 10_000.0,
) -> ConformerBlock:
    """One Macaron block with rotary MHSA and a depthwise conv of `kernel_size`."""
    return ConformerBlock(
        ffn1=FeedForward(dim=dim, hidden_dim=ffn_dim, dropout=dropout),
        attn=RotarySelfAttention(dim=dim, num_heads=num_heads, dropout=dropout, rope_base=rope_base),
        conv=ConvModule(dim=dim, kernel_size=kernel_size, dropout=dropout),
        ffn2=FeedForward(dim=dim, hidden_dim=ffn_dim, dropout=dropout),
        dim=dim,
        dropout=dropout,
    )


def conformer(
    *, dim: int, num_layers: int, num_heads: int, ffn_dim: int, kernel_size: int,
    dropout: float = 0.0, rope_base: float = 10_000.0, activation_checkpointing: bool = False,
    branch_init: float = 1.0,
) -> Conformer:
    """A `num_layers`-block rotary Conformer of width `dim`; `branch_init` scales the residual
    branches' last layers at initialisation (:func:`scale_branch_outputs`; 1.0: PyTorch's
    default initialisation)."""
    blocks = [
        conformer_block(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, kernel_size=kernel_size,
                        dropout=dropout, rope_base=rope_base)
        for _ in range(num_layers)
    ]
    if branch_init != 1.0:
        for block in blocks:
            scale_branch_outputs(block, branch_init)
    return Conformer(blocks, activation_checkpointing=activation_checkpointing)
