"""Small reference models for demos, benchmarks and tests."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CharTransformer", "mlp"]


def mlp(sizes: tuple[int, ...] = (64, 64, 10), activation: type[nn.Module] = nn.ReLU, seed: int | None = None
        ) -> nn.Sequential:
    """A multi-layer perceptron; with ``seed`` its initialisation is reproducible and independent of global RNG."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return mlp(sizes, activation)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        shape = (b, t, self.n_head, c // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """A small GPT-style character language model (pre-norm blocks, learned positions, tied embedding).

    ``forward(ids) -> logits``; ``loss(ids, targets)`` is the mean next-character cross-entropy (nats).
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layer: int = 2, n_head: int = 4, block: int = 64,
                 seed: int | None = None):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        gen_ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with gen_ctx:
            if seed is not None:
                torch.manual_seed(seed)
            self.block = block
            self.tok = nn.Embedding(vocab_size, d_model)
            self.pos = nn.Embedding(block, d_model)
            self.blocks = nn.ModuleList(_Block(d_model, n_head) for _ in range(n_layer))
            self.ln = nn.LayerNorm(d_model)
            for name, p in self.named_parameters():
                if name.endswith("weight") and p.dim() == 2:
                    nn.init.normal_(p, std=0.02 if "out" not in name else 0.02 / math.sqrt(2 * n_layer))
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.tok.weight.T

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

