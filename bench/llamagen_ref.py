"""A faithful re-implementation of LlamaGen's c2i GPT computation, the honest baseline for `bench/run.py`.

Written from docs/llamagen.md (§2, §5), not copied: the same module structure and state-dict keys (so it loads
our GPT's weights), and LlamaGen's own choices on the hot path, good or bad:
- training: class dropout inside the label embedder, token dropout, RMSNorm in float32, rotary in float32,
  K/V `repeat_interleave` even when it is a no-op, SDPA with is_causal, SwiGLU, full [B, S, V] logits cast to
  float32, the sliced logits made contiguous, F.cross_entropy on them;
- sampling (gpt-fast style): a KV cache of max_seq_len rounded up to a multiple of 8, every decode step attends
  over the WHOLE cache with the boolean `causal_mask[:, None, input_pos]`, CFG as one batched [cond; null]
  forward, logits / temperature, optional top-k, softmax and multinomial.
It is a benchmark baseline only; the project's model lives in star/gpt/model.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from star.gpt.config import GPTConfig
from star.gpt.rotary import build_rotary_table_2d


class RefRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def ref_apply_rotary(x, freqs_cis):
    """LlamaGen's apply_rotary_emb: x [B, S, H, hd], freqs_cis [S, hd/2, 2]."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, S, H, hd/2, 2]
    freqs = freqs_cis.view(1, pairs.size(1), 1, pairs.size(3), 2)
    out = torch.stack([pairs[..., 0] * freqs[..., 0] - pairs[..., 1] * freqs[..., 1],
                       pairs[..., 1] * freqs[..., 0] + pairs[..., 0] * freqs[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


class RefKVCache(nn.Module):
    def __init__(self, max_batch, max_seq, n_head, head_dim, dtype):
        super().__init__()
        shape = (max_batch, n_head, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))

    def update(self, input_pos, k, v):  # k, v [B, H, q, hd]; returns the WHOLE cache
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class RefAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dim = c.n_head, c.n_kv_head, c.head_dim, c.dim
        self.wqkv = nn.Linear(c.dim, (c.n_head + 2 * c.n_kv_head) * c.head_dim, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)
        self.resid_dropout = nn.Dropout(c.resid_dropout_p)
        self.kv_cache = None

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        bsz, seqlen, _ = x.shape
        kv_size = self.n_kv_head * self.head_dim
        xq, xk, xv = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        xq = ref_apply_rotary(xq.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis)
        xk = ref_apply_rotary(xk.view(bsz, seqlen, self.n_kv_head, self.head_dim), freqs_cis)
        xv = xv.view(bsz, seqlen, self.n_kv_head, self.head_dim)
        xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))
        keys, values = self.kv_cache.update(input_pos, xk, xv) if self.kv_cache is not None else (xk, xv)
        keys = keys.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        values = values.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        out = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, is_causal=mask is None)
        return self.resid_dropout(self.wo(out.transpose(1, 2).contiguous().view(bsz, seqlen, self.dim)))


class RefFeedForward(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(c.dim, c.ffn_hidden_dim, bias=False)
        self.w3 = nn.Linear(c.dim, c.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(c.ffn_hidden_dim, c.dim, bias=False)
        self.ffn_dropout = nn.Dropout(c.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class RefBlock(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.attention, self.feed_forward = RefAttention(c), RefFeedForward(c)
        self.attention_norm, self.ffn_norm = RefRMSNorm(c.dim, c.norm_eps), RefRMSNorm(c.dim, c.norm_eps)

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, input_pos, mask)  # DropPath(0) = Identity
        return h + self.feed_forward(self.ffn_norm(h))


class RefLabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class RefTransformer(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.cls_embedding = RefLabelEmbedder(c.num_classes, c.dim, c.class_dropout_prob)
        self.tok_dropout = nn.Dropout(c.token_dropout_p)
        self.layers = nn.ModuleList(RefBlock(c) for _ in range(c.n_layer))
        self.norm = RefRMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.freqs_cis = build_rotary_table_2d(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num)
        self.causal_mask = None

    def setup_caches(self, max_batch, max_seq_length, dtype):
        c = self.config
        max_seq_length = (max_seq_length + 7) // 8 * 8
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attention.kv_cache = RefKVCache(max_batch, max_seq_length, c.n_kv_head, c.head_dim, dtype).to(device)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))
        self.causal_mask = self.causal_mask[None].repeat(max_batch, 1, 1)  # [max_batch, L, L] as LlamaGen keeps it
        self.freqs_cis = self.freqs_cis.to(device)

    def forward(self, idx, cond_idx, input_pos=None, targets=None):
        c = self.config
        self.freqs_cis = self.freqs_cis.to(self.tok_embeddings.weight.device)
        if idx is not None and cond_idx is not None:  # training
            h = torch.cat([self.cls_embedding(cond_idx, self.training), self.tok_embeddings(idx)], dim=1)
            h = self.tok_dropout(h)
        elif cond_idx is not None:  # prefill
            h = self.cls_embedding(cond_idx, False)
        else:  # decode
            h = self.tok_embeddings(idx)
        if self.training:
            freqs_cis, mask = self.freqs_cis[: h.shape[1]], None
        else:
            freqs_cis = self.freqs_cis[input_pos]
            mask = self.causal_mask[: h.shape[0], None, input_pos]  # [B, 1, q, L]
        for layer in self.layers:
            h = layer(h, freqs_cis, input_pos, mask)
        logits = self.output(self.norm(h)).float()
        if self.training:
            logits = logits[:, c.cls_token_num - 1 :].contiguous()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def ref_sample(logits, temperature=1.0, top_k=0, generator=None):
    logits = logits[:, -1, :] / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits[logits < kth] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def ref_generate(model: RefTransformer, cond, cfg_scale: float, temperature=1.0, top_k=0, generator=None):
    """LlamaGen's generate for c2i (T = 1): [B, block_size] tokens."""
    c = model.config
    batch = cond.shape[0]
    cond_combined = torch.cat([cond, torch.full_like(cond, c.num_classes)]) if cfg_scale > 1.0 else cond
    model.setup_caches(cond_combined.shape[0], 1 + c.block_size, model.tok_embeddings.weight.dtype)
    seq = torch.empty(batch, 1 + c.block_size, dtype=torch.int, device=cond.device)

    def guided(logits):
        if cfg_scale > 1.0:
            cond_logits, uncond_logits = torch.split(logits, batch, dim=0)
            logits = uncond_logits + (cond_logits - uncond_logits) * cfg_scale
        return ref_sample(logits, temperature, top_k, generator)

    input_pos = torch.arange(0, 1, device=cond.device)
    logits, _ = model(None, cond_combined, input_pos)
    next_token = guided(logits)
    seq[:, 1:2] = next_token
    input_pos = torch.tensor([1], device=cond.device, dtype=torch.int)
    for i in range(c.block_size - 1):
        x = torch.cat([next_token, next_token]) if cfg_scale > 1.0 else next_token
        logits, _ = model(x, None, input_pos)
        input_pos += 1
        next_token = guided(logits)
        seq[:, 2 + i : 3 + i] = next_token
    return seq[:, 1:]
