"""The tiny byte-level causal transformer of the built-in demo experiment (and a reference for
the hidden-state protocol of :mod:`forgetkern.train`: ``forward_hidden`` +
``get_output_embeddings``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 384
    max_len: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        h = self.ln1(x)
        heads = lambda t: t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(heads(self.q_proj(h)), heads(self.k_proj(h)),
                                             heads(self.v_proj(h)), is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(B, L, D))
        return x + self.down_proj(F.gelu(self.up_proj(self.ln2(x))))


class TinyLM(nn.Module):
    """Pre-LayerNorm GPT over bytes: ``logits = lm_head(forward_hidden(input_ids))``."""

    def __init__(self, cfg: TinyConfig = TinyConfig()):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """``(B, L)`` token ids -> ``(B, L, d_model)`` final (normalized) hidden states."""
        L = input_ids.shape[-1]
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len={self.cfg.max_len}")
        x = self.embed(input_ids) + self.pos(torch.arange(L, device=input_ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return self.lm_head(self.forward_hidden(input_ids))


class LogitsOnly(nn.Module):
    """Wraps a model so that only ``forward`` (logits) is visible: forces the logits path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids)
