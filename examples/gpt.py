"""A small GPT in plain PyTorch, in the style of nanoGPT, for the examples and the tests.

Byte-level (vocabulary 256), pre-LayerNorm blocks, causal self-attention through
``torch.nn.functional.scaled_dot_product_attention`` and an LM head tied to the token embedding.
Nothing here knows about trainwarden: it is the model a user would bring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["GPT", "GPTConfig"]


@dataclass(frozen=True)
class GPTConfig:
    """Model shape. Frozen: a config describes a model, changing it means building a new one."""

    vocab_size: int = 256  # bytes
    block_size: int = 128  # longest context, sets the size of the position table
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    One fused ``c_attn`` projection makes q, k and v in a single matmul (one kernel instead of
    three). SDPA picks a flash / memory-efficient kernel where one exists, so the [T, T] attention
    matrix is never materialised on those back ends; on the CPU it falls back to the math kernel,
    which does hold it: activation memory then grows as B * n_head * T^2 per layer.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]: heads become a batch dimension for SDPA.
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward layer: 4x expansion, GELU. Holds 2/3 of a block's weights."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    Pre-LN keeps an identity path from the loss to every layer, so training is stable without a
    learning-rate warm-up being critical, at the cost of one final LayerNorm before the head.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer language model over bytes.

    ``activation_checkpointing`` (off by default) recomputes each block's activations in the
    backward pass instead of keeping them: roughly one extra forward pass of compute for the
    activation memory of all but one block at a time. It can be switched at any step boundary
    with :meth:`set_activation_checkpointing`; parameters are unaffected.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the input embedding and the output projection share one matrix. Saves
        # vocab_size * n_embd parameters (and their Adam moments) and generally helps small models.
        self.lm_head.weight = self.wte.weight
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: each residual projection scaled by 1/sqrt(2 * n_layer), because every block adds
        # two such outputs to the residual stream, whose variance would otherwise grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Turn per-block activation checkpointing on or off (takes effect at the next forward)."""
        self.activation_checkpointing = bool(enabled)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights counted once; ``non_embedding`` leaves out the position table
        (the token table stays in: it is also the LM head)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T.

        The 6N term is the matmuls with the weights (2 forward, 4 backward per weight per token);
        the second term is attention's score and value matmuls, which have no weights.
        """
        cfg = self.config
        t = cfg.block_size if seq_len is None else seq_len
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * t

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the next-byte cross-entropy if ``targets`` is given.

        ``reduction="mean"``: one scalar, the mean over all B*T tokens. ``reduction="none"``: a [B]
        tensor, the mean over each sample's T tokens; since every sample has T tokens its mean is
        the ``"mean"`` loss, and grouping it by domain gives per-domain losses from the same forward.
        """
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        # Full [B, T, vocab] logits: with vocab 256 they cost B*T*256 floats (plus as much for
        # their gradient), small next to the activations; no last-position-only shortcut needed.
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(b * t, -1), targets.reshape(b * t), reduction="none")
        loss = loss.view(b, t).mean(dim=1)
        return logits, (loss.mean() if reduction == "mean" else loss)

    def configure_optimizer(
        self,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on the matrices (matmul weights, embeddings) only.

        Biases and LayerNorm gains are left undecayed: decaying them pulls activations towards zero
        without regularising anything useful. Groups are named ``"decay"`` / ``"no_decay"``.
        """
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
