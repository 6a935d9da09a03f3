"""LlamaGen's class-conditional GPT (c2i), checkpoint-compatible, with a static KV cache for sampling.

Architecture and state-dict key names follow LlamaGen's `autoregressive/models/gpt.py` (see
docs/llamagen.md §2) so official checkpoints load strictly:

    tok_embeddings.weight                     [vocab, D]
    cls_embedding.embedding_table.weight      [num_classes + 1, D]   (row num_classes = null class)
    layers.{i}.attention.wqkv.weight          [(H + 2*H_kv) * hd, D]  split as [q | k | v]
    layers.{i}.attention.wo.weight            [D, D]
    layers.{i}.feed_forward.w1/w3.weight      [ffn, D];  w2: [D, ffn]
    layers.{i}.attention_norm/ffn_norm.weight [D]
    norm.weight [D];  output.weight [vocab, D]  (not tied, no biases anywhere)

Traps reproduced on purpose (docs/llamagen.md §0):
- the class position's rotary rows are ZERO (cos = sin = 0), so its q and k are zero vectors in every layer;
- rotary pairs are interleaved (x[2i], x[2i+1]); the first hd/4 pairs rotate by the grid row, the rest by the
  grid column;
- token dropout covers the whole sequence, class embedding included;
- RMSNorm is computed in float32.

Unlike LlamaGen, the model never drops class labels by itself: the trainer decides (`drop_class_labels`), so
the student and its EMA teacher can see the same labels.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------

# name -> (n_layer, n_head, dim), as LlamaGen's registry (docs/llamagen.md §2.2)
GPT_PRESETS: dict[str, dict[str, int]] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),
}

# LlamaGen ModelArgs fields that have no meaning for this c2i model; accepted in config files and ignored.
_IGNORED_LLAMAGEN_FIELDS = ("caption_dim", "max_batch_size", "max_seq_len")


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n (LlamaGen's rounding of the FFN width)."""
    return n if n % k == 0 else n + k - (n % k)


def preset_name(spec: str) -> Optional[str]:
    """Canonical preset name for 'GPT-B', 'gpt-b', 'B', ...; None when `spec` is not a preset."""
    key = spec.strip().upper()
    if not key.startswith("GPT-"):
        key = "GPT-" + key
    return key if key in GPT_PRESETS else None


@dataclass
class GPTConfig:
    """LlamaGen `ModelArgs` for class-conditional generation (same field names and defaults)."""

    dim: int
    n_layer: int
    n_head: int
    n_kv_head: Optional[int] = None  # None = n_head (plain multi-head attention)
    vocab_size: int = 16384
    num_classes: int = 1000
    block_size: int = 256  # image tokens per sample: 256 for 256 px, 576 for 384 px
    cls_token_num: int = 1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    class_dropout_prob: float = 0.1  # used by the trainer (drop_class_labels); the model never drops labels

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.dim % self.n_head != 0:
            raise ValueError(f"GPTConfig: dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 4 != 0:
            # 2D RoPE gives head_dim/4 rotary pairs to each axis
            raise ValueError(f"GPTConfig: head_dim={self.head_dim} (dim/n_head) must be a multiple of 4 for 2D RoPE")
        if self.cls_token_num != 1:
            raise ValueError(
                f"GPTConfig: cls_token_num={self.cls_token_num}; the class-conditional model has exactly one class "
                "position (LlamaGen's c2i label embedding yields one vector)"
            )
        _ = self.grid_size  # validates block_size

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def grid_size(self) -> int:
        """Side of the square token grid: sqrt(block_size)."""
        side = math.isqrt(self.block_size)
        if side * side != self.block_size:
            raise ValueError(
                f"GPTConfig: block_size={self.block_size} is not a perfect square; 2D RoPE needs a square token "
                "grid (256 = 16x16 for 256 px, 576 = 24x24 for 384 px)"
            )
        return side

    @property
    def null_class(self) -> int:
        """Label of the unconditional (CFG) class: the last row of the class table."""
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "<dict>") -> "GPTConfig":
        values = dict(values)
        if "config" in values and isinstance(values["config"], Mapping):
            values = dict(values["config"])  # {"config": {...}, "note": ...} as in our fixtures and save_gpt
        model_type = values.pop("model_type", "c2i")
        if model_type != "c2i":
            raise ValueError(f"{source}: model_type={model_type!r}; only class-conditional 'c2i' is supported")
        for name in _IGNORED_LLAMAGEN_FIELDS:
            values.pop(name, None)
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{source}: unknown GPT config field(s) {unknown}; known fields: {cls.field_names()}")
        missing = [name for name in ("dim", "n_layer", "n_head") if name not in values]
        if missing:
            raise ValueError(f"{source}: GPT config lacks required field(s) {missing}")
        return cls(**values)

    @classmethod
    def resolve(cls, spec: "str | Path | Mapping[str, Any] | GPTConfig", **overrides: Any) -> "GPTConfig":
        """A config from a preset name ('GPT-B' or 'B'), a JSON file, a dict or a GPTConfig, plus overrides.

        JSON files may hold the fields directly or under "config" (the fixture format and `save_gpt`'s).
        """
        if isinstance(spec, GPTConfig):
            base, source = spec.to_dict(), "GPTConfig"
        elif isinstance(spec, Mapping):
            base, source = dict(spec), "<dict>"
            if "config" in base and isinstance(base["config"], Mapping):
                base = dict(base["config"])
        else:
            name = preset_name(str(spec)) if isinstance(spec, str) else None
            if name is not None:
                base, source = dict(GPT_PRESETS[name]), name
            else:
                path = Path(spec)
                if not path.is_file():
                    raise FileNotFoundError(
                        f"GPT config {str(spec)!r} is neither a preset ({', '.join(GPT_PRESETS)}) nor an existing "
                        "JSON file"
                    )
                try:
                    base = json.loads(path.read_text())
                except json.JSONDecodeError as error:
                    raise ValueError(f"GPT config file {path} is not valid JSON: {error}") from error
                source = str(path)
                if not isinstance(base, Mapping):
                    raise ValueError(f"GPT config file {path} must hold a JSON object, got {type(base).__name__}")
                if "config" in base and isinstance(base["config"], Mapping):
                    base = dict(base["config"])
        unknown = sorted(set(overrides) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"GPT config overrides {unknown} are not fields; known fields: {cls.field_names()}")
        base = dict(base)
        if "n_head" in overrides and "n_kv_head" not in overrides and base.get("n_kv_head") == base.get("n_head"):
            base["n_kv_head"] = None  # plain multi-head attention follows the new n_head
        base.update(overrides)
        return cls.from_dict(base, source=source)


def drop_class_labels(
    labels: torch.Tensor, prob: float, null_class: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Replace each label by `null_class` independently with probability `prob` (LlamaGen's class dropout).

    The trainer calls this once per image so student, teacher and every view see the same labels.
    """
    if prob <= 0.0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < prob  # [B]
    return torch.where(drop, torch.full_like(labels, null_class), labels)


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight  # LlamaGen casts back before the weight


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


class KVCache:
    """Static per-layer key/value store [max_batch, H_kv, max_seq, hd] (plain tensors, not module buffers, so
    they never reach a state_dict, DDP buffer broadcast or `.to()`)."""

    def __init__(self, max_batch: int, n_kv_head: int, max_seq_len: int, head_dim: int, dtype, device):
        shape = (max_batch, n_kv_head, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        if self.k.is_cuda:
            # CUDA graphs (torch.compile mode="reduce-overhead") replay only when tensors mutated inside the
            # graph keep their address; parameters and buffers do, plain tensors must be marked.
            torch._dynamo.mark_static_address(self.k)
            torch._dynamo.mark_static_address(self.v)

    def fits(self, max_batch: int, max_seq_len: int, dtype, device) -> bool:
        return (
            self.k.shape[0] >= max_batch
            and self.k.shape[2] >= max_seq_len
            and self.k.dtype == dtype
            and self.k.device == torch.empty(0, device=device).device  # 'cuda' -> 'cuda:0'
            and self.k.is_inference() == torch.is_inference_mode_enabled()
        )

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_len: Optional[int]):
        """Write k, v [B, H_kv, q, hd] at `input_pos`; return the first cache_len slots [B, H_kv, cache_len, hd],
        or with cache_len None every slot [B, H_kv, max_seq, hd] (static shapes: the caller masks)."""
        batch = k.shape[0]
        self.k[:batch].index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v[:batch].index_copy_(2, input_pos, v.to(self.v.dtype))
        if cache_len is None:
            return self.k[:batch], self.v[:batch]
        return self.k[:batch, :, :cache_len], self.v[:batch, :, :cache_len]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        self.kv_cache: Optional[KVCache] = None

    def _project(self, x: torch.Tensor, rotary: torch.Tensor):
        batch, seq, _ = x.shape
        q_size = self.n_head * self.head_dim
        kv_size = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary(q.view(batch, seq, self.n_head, self.head_dim), rotary)
        k = apply_rotary(k.view(batch, seq, self.n_kv_head, self.head_dim), rotary)
        v = v.view(batch, seq, self.n_kv_head, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(_kv), S, hd]

    def _attend(self, q, k, v, attn_mask, is_causal: bool) -> torch.Tensor:
        if self.n_kv_head != self.n_head:
            repeat = self.n_head // self.n_kv_head
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        if q.device.type == "cpu" and q.dtype != torch.float32:
            # The CPU's bf16 attention kernel is slow (its backward ~8x the fp32 one's at head_dim 32); under
            # autocast the projections stay bf16 and the attention runs in fp32, as GPUs' flash kernels accumulate.
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                     is_causal=is_causal, dropout_p=dropout_p).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 dropout_p=dropout_p)  # [B, H, S, hd]
        batch, _, seq, _ = out.shape
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(batch, seq, -1)))

    def forward(self, x: torch.Tensor, rotary: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self._project(x, rotary)
        return self._attend(q, k, v, attn_bias, is_causal=attn_bias is None)

    def forward_cached(
        self, x: torch.Tensor, rotary: torch.Tensor, input_pos: torch.Tensor, cache_len: Optional[int]
    ) -> torch.Tensor:
        """cache_len: attend over slots 0..cache_len-1 (dynamic shapes), or None: over the whole preallocated
        cache with a mask built from input_pos on the device (static shapes, no host sync; LlamaGen's way)."""
        if self.kv_cache is None:
            raise RuntimeError("forward_cached needs a KV cache: call GPT.setup_kv_cache(...) first")
        q, k, v = self._project(x, rotary)
        k, v = self.kv_cache.update(input_pos, k, v, cache_len)  # [B, H_kv, cache_len or max_seq, hd]
        mask = None
        if cache_len is None or q.shape[2] > 1:  # each new position sees the cache up to its own position
            mask = torch.arange(k.shape[2], device=q.device)[None, :] <= input_pos[:, None]  # [q, keys]
        return self._attend(q, k, v, mask, is_causal=False)


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's DropPath with scale_by_keep, as LlamaGen uses)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig, drop_path_rate: float):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path_rate = drop_path_rate

    def forward(self, x, rotary, attn_bias):
        rate, training = self.drop_path_rate, self.training
        h = x + drop_path(self.attention(self.attention_norm(x), rotary, attn_bias), rate, training)
        return h + drop_path(self.feed_forward(self.ffn_norm(h)), rate, training)

    def forward_cached(self, x, rotary, input_pos, cache_len):
        h = x + self.attention.forward_cached(self.attention_norm(x), rotary, input_pos, cache_len)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class table with num_classes + 1 rows; row num_classes is the learned null class. Never drops labels."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels).unsqueeze(1)  # [B, 1, D]


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GPTOutput:
    logits: Optional[torch.Tensor]  # [B, S, vocab] float32; position s predicts image token s (None: no head)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> residual stream after k blocks [B, S, D]
    final_hidden: Optional[torch.Tensor] = None  # output of the final RMSNorm [B, S, D]
    loss: Optional[torch.Tensor] = None  # next-token cross-entropy (scalar, float32) when targets were given


def causal_bias(seq_len: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive causal mask [S, S]: 0 on and below the diagonal, -inf above. Add key masks to it for ST-AR."""
    bias = torch.zeros(seq_len, seq_len, device=device, dtype=dtype)
    above = torch.ones(seq_len, seq_len, device=device, dtype=torch.bool).triu(1)
    return bias.masked_fill(above, float("-inf"))


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, cls_token_num: int = 1) -> torch.Tensor:
    """Mean cross-entropy of logits [B, S, V] against the full token sequence [B, T] (LlamaGen's loss).

    Position cls_token_num - 1 + t predicts token t.
    """
    num_tokens = tokens.shape[1]
    start = cls_token_num - 1
    predicting = logits[:, start : start + num_tokens]  # [B, T, V]
    if predicting.shape[1] != num_tokens:
        raise ValueError(f"next_token_loss: logits cover {predicting.shape[1]} positions, tokens have {num_tokens}")
    return F.cross_entropy(predicting.reshape(-1, predicting.shape[-1]).float(), tokens.reshape(-1))


# Rows of logits per chunk in the fused head + loss: about 16 MiB of float32 logits at a time, small enough to
# stay in cache, large enough that each chunk's matmuls run at full speed.
_HEAD_CHUNK_ELEMENTS = 1 << 22


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (hidden @ weight.T) against targets, without materialising the [N, V] logits.

    The gradients are computed chunk by chunk during the forward (softmax - one_hot is all the backward of
    cross-entropy needs), so the backward only scales them: the same three matmuls as the plain head, but the
    float32 logits live one chunk at a time instead of three full [N, V] tensors (logits, log-softmax, its grad).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, need_grads):
        rows = hidden.shape[0]  # hidden [N, D], weight [V, D], targets [N]
        chunk = max(1, _HEAD_CHUNK_ELEMENTS // weight.shape[0])
        weight_c = weight.to(compute_dtype)
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grads else None
        for start in range(0, rows, chunk):
            part = hidden[start : start + chunk].to(compute_dtype)  # [n, D]
            target = targets[start : start + chunk]  # [n]
            logits = (part @ weight_c.t()).float()  # [n, V] float32, as LlamaGen's .float() logits
            target_logit = logits.gather(1, target[:, None]).squeeze(1)  # [n]
            row_max = logits.amax(dim=-1, keepdim=True)  # [n, 1]
            exps = logits.sub_(row_max).exp_()  # in place: one exp pass serves the loss and the gradient
            row_sum = exps.sum(dim=-1, keepdim=True)  # [n, 1]
            loss_sum += (row_sum.log() + row_max - target_logit[:, None]).sum()
            if need_grads:
                probs = exps.div_(row_sum)  # softmax
                probs[torch.arange(probs.shape[0], device=probs.device), target] -= 1.0  # d loss_sum / d logits
                probs = probs.mul_(1.0 / rows).to(compute_dtype)  # d mean loss / d logits
                grad_hidden[start : start + chunk] = (probs @ weight_c).to(hidden.dtype)
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(probs.t(), part)  # [V, D], accumulated in place
                else:
                    grad_weight += (probs.t() @ part).float()
        if need_grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss_sum / rows

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss, None, None, None


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy((hidden @ weight.T).float(), targets)` computed in row chunks (same value and grads).

    hidden [N, D] (final normed states), weight [V, D] (the LM head), targets [N]. Under autocast the matmuls
    run in the autocast dtype, as nn.Linear's would; the softmax is always float32.
    """
    device_type = hidden.device.type
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _ChunkedHeadCrossEntropy.apply(hidden, weight, targets, compute_dtype, need_grads)


class GPT(nn.Module):
    """LlamaGen c2i transformer. Sequence layout: [class position, image tokens...]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        rates = torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(config, rate) for rate in rates)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # [cls + block_size, hd/2, 2]; not in state_dict, rebuilt in float32 whenever the module moves
        self.register_buffer("freqs_cis", self._rotary_table(device=None), persistent=False)
        self._cache_batch_capacity = self._cache_len_capacity = 0  # set by setup_kv_cache
        self.reset_parameters()

    def _rotary_table(self, device) -> torch.Tensor:
        c = self.config
        return build_rotary_table_2d(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num, device=device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # `.to(bf16)` or `.to_empty()` would damage the table; it is cheap to rebuild in float32
        self.freqs_cis = self._rotary_table(device=self.freqs_cis.device)
        return self

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.output.weight)

    # --- teacher-forced / training forward ---------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        attn_bias: Optional[torch.Tensor] = None,
        return_layers: Sequence[int] = (),
        return_final_hidden: bool = False,
        head: bool = True,
        targets: Optional[torch.Tensor] = None,
    ) -> GPTOutput:
        """Teacher-forced pass over [class, tokens[:, 0], ..., tokens[:, L-1]] (S = 1 + L positions).

        tokens: [B, L] image tokens (usually the first block_size - 1 of the grid); labels: [B] class ids
        (null class = num_classes; dropping labels is the caller's job).
        attn_bias: None for plain causal attention, or the FULL mask (causal part included), broadcastable to
        [B, 1, S, S]: boolean (True = attend; the cheapest form, SDPA takes it as is) or additive float (0 =
        attend, -inf = hidden; e.g. `causal_bias(S)` plus key masks). A query row must keep at least one key
        (never hide the diagonal) or its output is NaN.
        return_layers: k in 0..n_layer -> `hidden[k]`, the residual stream after k blocks.
        head: False skips the LM head (logits None): for callers that need only hidden states (the EMA teacher).
        targets: the full token sequence [B, T] (T = L + 1): the next-token loss (`next_token_loss`'s value)
        goes to `loss`, computed by a chunked head so the [B, S, V] logits never exist (logits None).
        """
        c = self.config
        seq_len = c.cls_token_num + tokens.shape[1]
        if seq_len > self.freqs_cis.shape[0]:
            raise ValueError(
                f"GPT.forward: {tokens.shape[1]} tokens exceed block_size={c.block_size} (+{c.cls_token_num} class)"
            )
        for k in return_layers:
            if not 0 <= k <= c.n_layer:
                raise ValueError(f"GPT.forward: return_layers entry {k} is outside 0..{c.n_layer}")
        h = torch.cat([self.cls_embedding(labels), self.tok_embeddings(tokens)], dim=1)  # [B, S, D]
        h = self.tok_dropout(h)
        rotary = self.freqs_cis[:seq_len]  # [S, hd/2, 2]
        wanted = set(return_layers)
        hidden: dict[int, torch.Tensor] = {0: h} if 0 in wanted else {}
        for index, layer in enumerate(self.layers, start=1):
            h = layer(h, rotary, attn_bias)
            if index in wanted:
                hidden[index] = h
        normed = self.norm(h)  # [B, S, D]
        final_hidden = normed if return_final_hidden else None
        if targets is not None:
            predicting = normed[:, c.cls_token_num - 1 :]  # [B, T, D]: position cls - 1 + t predicts token t
            if predicting.shape[1] != targets.shape[1]:
                raise ValueError(f"GPT.forward: targets hold {targets.shape[1]} tokens, the inputs predict "
                                 f"{predicting.shape[1]} (pass the full sequence, inputs are targets[:, :-1])")
            loss = chunked_head_loss(predicting.reshape(-1, c.dim), self.output.weight, targets.reshape(-1))
            return GPTOutput(logits=None, hidden=hidden, final_hidden=final_hidden, loss=loss)
        logits = self.output(normed).float() if head else None  # [B, S, V]
        return GPTOutput(logits=logits, hidden=hidden, final_hidden=final_hidden)

    # --- KV-cache inference --------------------------------------------------------------------------------

    def setup_kv_cache(self, max_batch: int, max_seq_len: int, dtype: torch.dtype, device) -> None:
        """Allocate static caches [max_batch, H_kv, max_seq_len, hd] per layer (kept if already big enough)."""
        c = self.config
        for layer in self.layers:
            cache = layer.attention.kv_cache
            if cache is None or not cache.fits(max_batch, max_seq_len, dtype, device):
                layer.attention.kv_cache = KVCache(max_batch, c.n_kv_head, max_seq_len, c.head_dim, dtype, device)
        first = self.layers[0].attention.kv_cache
        self._cache_batch_capacity, self._cache_len_capacity = first.k.shape[0], first.k.shape[2]

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self._cache_batch_capacity = self._cache_len_capacity = 0

    def forward_cached(
        self,
        tokens: Optional[torch.Tensor],
        labels: Optional[torch.Tensor],
        input_pos: torch.Tensor,
        cache_len: Optional[int] = None,
        static: bool = False,
    ) -> torch.Tensor:
        """Incremental forward with the KV cache; returns logits [B, q, vocab] float32 for the new positions.

        Prefill: labels [B] (class embedding at position 0, zero rotary row), tokens None (or a prefix
        [B, L] after the class), input_pos = arange(q). Decode: tokens [B, 1], labels None, input_pos = [p].
        Dynamic (default): attention reads only the filled cache slots 0..cache_len-1; cache_len defaults to
        input_pos[-1] + 1 (pass it as a Python int to avoid a device sync). static=True: attention reads the
        whole preallocated cache under a mask from input_pos, so every decode step has the same shapes and no
        host sync (for CUDA graphs); positions are then not range-checked on the host.
        B may be smaller than the cache's batch: rows 0..B-1.
        """
        parts = []
        if labels is not None:
            parts.append(self.cls_embedding(labels))  # [B, 1, D]
        if tokens is not None:
            parts.append(self.tok_embeddings(tokens))  # [B, L, D]
        if not parts:
            raise ValueError("forward_cached needs tokens, labels or both")
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [B, q, D]
        if h.shape[1] != input_pos.shape[0]:
            raise ValueError(f"forward_cached: {h.shape[1]} new positions but input_pos has {input_pos.shape[0]}")
        if cache_len is None and not static:
            cache_len = int(input_pos[-1]) + 1
        if self._cache_batch_capacity == 0:
            raise RuntimeError("forward_cached needs a KV cache: call GPT.setup_kv_cache(...) first")
        if h.shape[0] > self._cache_batch_capacity:
            raise ValueError(
                f"forward_cached: batch {h.shape[0]} exceeds the KV cache's batch {self._cache_batch_capacity}; call "
                "setup_kv_cache with a larger max_batch"
            )
        if cache_len is not None and cache_len > self._cache_len_capacity:
            raise ValueError(
                f"forward_cached: position {cache_len - 1} does not fit the KV cache (capacity "
                f"{self._cache_len_capacity}); call setup_kv_cache with a larger max_seq_len"
            )
        rotary = self.freqs_cis[input_pos]  # [q, hd/2, 2]
        for layer in self.layers:
            h = layer.forward_cached(h, rotary, input_pos, None if static else cache_len)
        return self.output(self.norm(h)).float()

    # --- checkpoints ----------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: "GPTConfig | str | Path | Mapping[str, Any]") -> "GPT":
        """An official LlamaGen checkpoint loaded strictly into a GPT for `config` (eval mode).

        Kept for LlamaGen users; the loading lives in star/checkpoint.py (`load_llamagen_gpt`).
        """
        from star.checkpoint import load_llamagen_gpt

        return load_llamagen_gpt(path, config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
