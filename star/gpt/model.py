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

Unlike LlamaGen, the model never drops class labels by itself: the trainer decides (star/train/objectives.py
`drop_class_labels`), so the student and its EMA teacher can see the same labels. The configuration and presets
are star/gpt/config.py; the head's fused next-token loss is star/gpt/head_loss.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from star.gpt.config import GPT_PRESETS, GPTConfig  # noqa: F401 (GPT_PRESETS: the names callers import from here)
from star.gpt.head_loss import chunked_head_loss
from star.gpt.rotary import apply_rotary, build_rotary_table_2d

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

    def forward(self, x: torch.Tensor, rotary: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self._project(x, rotary)
        return self._attend(q, k, v, attn_mask, is_causal=attn_mask is None)

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

    def forward(self, x, rotary, attn_mask):
        rate, training = self.drop_path_rate, self.training
        h = x + drop_path(self.attention(self.attention_norm(x), rotary, attn_mask), rate, training)
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
        attn_mask: Optional[torch.Tensor] = None,
        return_layers: Sequence[int] = (),
        return_final_hidden: bool = False,
        head: bool = True,
        targets: Optional[torch.Tensor] = None,
    ) -> GPTOutput:
        """Teacher-forced pass over [class, tokens[:, 0], ..., tokens[:, L-1]] (S = 1 + L positions).

        tokens: [B, L] image tokens (usually the first block_size - 1 of the grid); labels: [B] class ids
        (null class = num_classes; dropping labels is the caller's job).
        attn_mask: None for plain causal attention, or the FULL mask (causal part included), broadcastable to
        [B, 1, S, S]: boolean (True = attend; the cheapest form, SDPA takes it as is) or additive float (0 =
        attend, -inf = hidden). A query row must keep at least one key (never hide the diagonal) or its output
        is NaN.
        return_layers: k in 0..n_layer -> `hidden[k]`, the residual stream after k blocks.
        head: False skips the LM head (logits None): for callers that need only hidden states (the EMA teacher).
        targets: the full token sequence [B, T] (T = L + 1): the mean next-token cross-entropy goes to `loss`,
        computed by a chunked head so the [B, S, V] logits never exist (logits None).
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
            h = layer(h, rotary, attn_mask)
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

    def forward_cached(self, tokens: Optional[torch.Tensor], labels: Optional[torch.Tensor], input_pos: torch.Tensor,
                       cache_len: Optional[int]) -> torch.Tensor:
        """Incremental forward with the KV cache; returns logits [B, q, vocab] float32 for the new positions.

        Prefill: labels [B] (class embedding at position 0, zero rotary row), tokens None (or a prefix
        [B, L] after the class), input_pos = arange(q). Decode: tokens [B, 1], labels None, input_pos = [p].
        cache_len: attention reads only the filled cache slots 0..cache_len-1 (dynamic shapes), or, with None,
        the whole preallocated cache under a mask from input_pos, so every decode step has the same shapes and
        no host sync (static, for CUDA graphs; positions are then not range-checked on the host).
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
            h = layer.forward_cached(h, rotary, input_pos, cache_len)
        return self.output(self.norm(h)).float()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
