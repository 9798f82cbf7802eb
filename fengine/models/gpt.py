"""A small GPT: a decoder-only causal transformer for character-level language modelling.

The architecture of GPT-2 (pre-norm blocks, learned positions, GELU MLP) at toy size,
written out so every piece is visible: ``recipes/gpt.py`` trains it. Dropout layers are
plain ``nn.Dropout``: they draw from torch's default generator, which fengine's step
seeds from ``fold_in(seed, step, micro)`` (`fengine.rng`), so a run resumed at any step
draws the same masks. `GPT.generate` samples with an explicit ``torch.Generator`` and
never touches the global one.
"""

from __future__ import annotations

import math

import torch
from torch import nn


__all__ = ["GPT"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions <= t."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"GPT: dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, head_dim)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = self.attn_drop(att.masked_fill(future, float("-inf")).softmax(-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _check_ids(owner: str, name: str, idx: torch.Tensor) -> None:
    """Refuse token ids that are not an integer ``(batch, t)`` tensor (a 1-D sequence would
    fail deep inside with an IndexError; float ids inside the embedding)."""
    if not isinstance(idx, torch.Tensor) or idx.ndim != 2:
        got = f"shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else repr(idx)
        raise ValueError(
            f"{owner}: {name} must be token ids of shape (batch, t) (a single sequence: "
            f"{name}[None]), got {got}"
        )
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"{owner}: {name} must be integer token ids, got dtype {idx.dtype}")


def _check_generate(
    idx: torch.Tensor, new_tokens: int, temperature: float, top_k: int | None
) -> None:
    """`GPT.generate`'s arguments, refused up front with what was expected (torch's own errors
    for these name neither the argument nor the value)."""
    _check_ids("GPT.generate", "idx", idx)
    if idx.shape[1] < 1:
        raise ValueError(
            "GPT.generate: idx must hold at least one token per row (a prompt), got t=0"
        )
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise ValueError(f"GPT.generate: new_tokens must be an int >= 0, got {new_tokens!r}")
    if not temperature > 0:  # also refuses NaN
        raise ValueError(f"GPT.generate: temperature must be > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"GPT.generate: top_k must be None or an int >= 1, got {top_k!r}")


class GPT(nn.Module):
    """``GPT(vocab_size, block_size)(idx) -> logits``: ``idx`` is ``(batch, t)`` token ids with
    ``t <= block_size``, the logits ``(batch, t, vocab_size)`` predict each next token.

    Weights are initialised as GPT-2's (normal, std 0.02; residual projections scaled by
    ``1/sqrt(2 * layers)``), drawn from torch's global generator: seed it first
    (`fengine.seed_everything`).
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        *,
        layers: int = 2,
        heads: int = 4,
        dim: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size),
                            ("layers", layers), ("heads", heads), ("dim", dim)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT: {name} must be an int >= 1, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GPT: dropout must be in [0, 1), got {dropout!r}")
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(dim, heads, dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _check_ids("GPT", "idx", idx)
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"GPT: sequence length {t} exceeds block_size {self.block_size}")
        positions = torch.arange(t, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(positions))
        return self.head(self.ln(self.blocks(x)))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        new_tokens: int,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Append ``new_tokens`` sampled tokens to ``idx`` ``(batch, t)``, one at a time, each
        from the softmax of the last logits / ``temperature`` (only the ``top_k`` largest when
        given), drawn from ``generator``: the same generator state gives the same text.
        Call it in eval mode (no dropout)."""
        _check_generate(idx, new_tokens, temperature, top_k)
        for _ in range(new_tokens):
            logits = self(idx[:, -self.block_size :])[:, -1, :].float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
