"""Plain reference computations the tests compare the fast paths with (never used by the project itself)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from star.train.objectives import key_mask


def causal_bias(seq_len: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive causal mask [S, S]: 0 on and below the diagonal, -inf above."""
    bias = torch.zeros(seq_len, seq_len, device=device, dtype=dtype)
    above = torch.ones(seq_len, seq_len, device=device, dtype=torch.bool).triu(1)
    return bias.masked_fill(above, float("-inf"))


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, cls_token_num: int = 1) -> torch.Tensor:
    """Mean cross-entropy of full logits [B, S, V] against the token sequence [B, T] (LlamaGen's loss): position
    cls_token_num - 1 + t predicts token t."""
    num_tokens = tokens.shape[1]
    start = cls_token_num - 1
    predicting = logits[:, start : start + num_tokens]  # [B, T, V]
    if predicting.shape[1] != num_tokens:
        raise ValueError(f"next_token_loss: logits cover {predicting.shape[1]} positions, tokens have {num_tokens}")
    return F.cross_entropy(predicting.reshape(-1, predicting.shape[-1]).float(), tokens.reshape(-1))


def key_mask_bias(batch: int, seq_len: int, ratio: float, generator: torch.Generator | None = None,
                  device=None, dtype=torch.float32, cls_token_num: int = 1) -> torch.Tensor:
    """`key_mask` as an additive float mask [B, 1, S, S] (0 = attend, -inf = hidden), same draw."""
    visible = key_mask(batch, seq_len, ratio, generator, device, cls_token_num)
    return torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill(~visible, float("-inf"))
