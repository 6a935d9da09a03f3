"""LlamaGen's 2D rotary position embedding, reproduced on purpose (docs/llamagen.md §0): interleaved pairs
(x[2i], x[2i+1]); the first head_dim/4 pairs rotate by the token's grid row, the rest by its column; the class
position's rows are ZERO (cos = sin = 0), so its query and key are zero vectors."""
from __future__ import annotations

from typing import Optional

import torch


def build_rotary_table_2d(
    grid_size: int, head_dim: int, base: float, cls_token_num: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """(cos, sin) table for 2D RoPE: [cls_token_num + grid_size**2, head_dim // 2, 2], float32.

    Pair i < head_dim/4 rotates by the token's grid row, the remaining pairs by its column; token t sits at
    (row, col) = (t // grid, t % grid). The first cls_token_num rows are all ZERO (cos = sin = 0), as in
    LlamaGen: the class position's q and k become zero vectors.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device=device)[: half // 2].float() / half))  # [hd/4]
    positions = torch.arange(grid_size, device=device, dtype=torch.float32)  # [G]
    angles_1d = torch.outer(positions, freqs)  # [G, hd/4]
    angles_2d = torch.cat(
        [
            angles_1d[:, None, :].expand(-1, grid_size, -1),  # row angle, constant along a row
            angles_1d[None, :, :].expand(grid_size, -1, -1),  # column angle
        ],
        dim=-1,
    )  # [G, G, hd/2]
    table = torch.stack([torch.cos(angles_2d), torch.sin(angles_2d)], dim=-1).flatten(0, 1)  # [G*G, hd/2, 2]
    prefix = torch.zeros(cls_token_num, half, 2, device=device, dtype=table.dtype)
    return torch.cat([prefix, table], dim=0)


def _complex_view(pairs: torch.Tensor) -> torch.Tensor:
    """[..., n, 2] float32 -> [..., n] complex64 without a copy when the strides allow it (they do for the
    q/k slices of the fused wqkv output)."""
    try:
        return torch.view_as_complex(pairs)
    except RuntimeError:  # odd strides or offset: copy once
        return torch.view_as_complex(pairs.contiguous())


def apply_rotary(x: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, S, H, hd] by rotary [S, hd/2, 2] (in float32)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, S, H, hd/2, 2]
    if not torch.compiler.is_compiling():
        # (x0 + i x1)(cos + i sin) is the same rotation as one complex multiply: one pass over x forward and
        # backward instead of six elementwise ops and a stack (bit-identical here); inductor prefers real ops
        rotation = torch.view_as_complex(rotary.float().contiguous()).view(1, pairs.shape[1], 1, pairs.shape[3])
        return torch.view_as_real(_complex_view(pairs) * rotation).flatten(3).type_as(x)
    rotary = rotary.float().view(1, pairs.shape[1], 1, pairs.shape[3], 2)
    cos, sin = rotary[..., 0], rotary[..., 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return rotated.flatten(3).type_as(x)
