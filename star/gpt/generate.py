"""Class-conditional sampling with a static KV cache and classifier-free guidance (LlamaGen's generate).

CFG runs as ONE batched forward on [cond; null] (conditional half first, null label = num_classes); the
guided logits are uncond + s * (cond - uncond) and the same sampled token is fed to both halves.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from star.gpt.model import GPT


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Sample one token per row of logits [B, V]; returns [B] int64.

    temperature: logits are divided by max(temperature, 1e-5) (LlamaGen's guard; ~greedy near 0).
    top_k: keep the k largest logits (ties with the k-th kept); 0 = no top-k filter; 1 = argmax.
    top_p: keep the most likely tokens until their total probability exceeds top_p (the token that crosses
    the threshold is kept); 1.0 = no filter. At least one token always survives.
    generator: must live on the logits' device.
    """
    if top_k < 0:
        raise ValueError(f"sample_logits: top_k={top_k} must be >= 0 (0 = no top-k filter)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample_logits: top_p={top_p} must be in (0, 1] (1.0 = no nucleus filter)")
    if top_k == 1:
        return logits.argmax(dim=-1)  # exact greedy, no random draw
    logits = logits.float() / max(temperature, 1e-5)  # [B, V]
    if 0 < top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
        # drop a token when the mass of the tokens before it already exceeds top_p (LlamaGen / HF rule);
        # the most likely token always stays
        remove_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        remove_sorted[..., 1:] = cumulative[..., :-1] > top_p
        remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def cfg_scale_at(step: int, num_steps: int, cfg_scale: float, cfg_schedule: str) -> float:
    """Guidance scale for image token `step` (0-based) of `num_steps`.

    constant: s at every step. linear: 1 + (s - 1) * step / (num_steps - 1), i.e. 1 for the first token
    rising to s for the last one.
    """
    if cfg_schedule == "constant":
        return cfg_scale
    if cfg_schedule == "linear":
        if num_steps <= 1:
            return cfg_scale
        return 1.0 + (cfg_scale - 1.0) * step / (num_steps - 1)
    raise ValueError(f"cfg_schedule={cfg_schedule!r}; choose 'constant' or 'linear'")


def _decode_step(model: GPT, tokens: torch.Tensor, input_pos: torch.Tensor, cache_len: int) -> torch.Tensor:
    return model.forward_cached(tokens, None, input_pos, cache_len=cache_len)[:, -1]  # [B, V]


_compiled_decode_step: Optional[Callable] = None


def _get_decode_step(compile_decode: bool) -> Callable:
    global _compiled_decode_step
    if not compile_decode:
        return _decode_step
    if _compiled_decode_step is None:
        # the cache length grows every step: dynamic shapes avoid one recompile per position
        _compiled_decode_step = torch.compile(_decode_step, dynamic=True)
    return _compiled_decode_step


def generate(
    model: GPT,
    labels: torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    cfg_interval: int = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    compile_decode: bool = False,
) -> torch.Tensor:
    """Sample block_size image tokens per label; returns LongTensor [B, block_size] in raster order.

    labels: [B] class ids (moved to the model's device). CFG is used when cfg_scale != 1.0: the batch becomes
    [cond; null] (2B rows) and logits = uncond + s_t * (cond - uncond), with s_t from `cfg_scale_at`.
    cfg_interval (LlamaGen): when > -1, CFG stops after decode step i > cfg_interval (i.e. from image token
    cfg_interval + 2 on); from then on only the conditional half is run. The prefill (token 0) always uses CFG.
    Deterministic for a given generator (on the model's device). compile_decode: torch.compile the decode
    step (GPU only; untested on CPU). The model runs in eval mode; its previous mode is restored.
    """
    config = model.config
    num_tokens = config.block_size
    device = model.tok_embeddings.weight.device
    batch = labels.shape[0]
    use_cfg = cfg_scale != 1.0
    cfg_scale_at(0, num_tokens, cfg_scale, cfg_schedule)  # validates the schedule name early
    decode_step = _get_decode_step(compile_decode)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            labels = labels.to(device=device, dtype=torch.long)
            if use_cfg:
                labels = torch.cat([labels, torch.full_like(labels, config.null_class)])  # [2B] cond first
            prefix = config.cls_token_num
            max_seq_len = prefix + num_tokens
            model.setup_kv_cache(labels.shape[0], max_seq_len, model.tok_embeddings.weight.dtype, device)

            def pick(logits: torch.Tensor, step: int, guided: bool) -> torch.Tensor:
                if guided:
                    cond, uncond = logits.split(batch, dim=0)
                    scale = cfg_scale_at(step, num_tokens, cfg_scale, cfg_schedule)
                    logits = uncond + scale * (cond - uncond)
                return sample_logits(logits, temperature, top_k, top_p, generator)  # [B]

            tokens = torch.empty(batch, num_tokens, dtype=torch.long, device=device)  # [B, N]
            prefill_pos = torch.arange(prefix, device=device)
            logits = model.forward_cached(None, labels, prefill_pos, cache_len=prefix)[:, -1]  # [B or 2B, V]
            tokens[:, 0] = pick(logits, 0, use_cfg)

            guided = use_cfg
            for step in range(1, num_tokens):
                decode_index = step - 1  # LlamaGen's loop counter i
                if guided and cfg_interval > -1 and decode_index > cfg_interval:
                    guided = False  # once off, CFG stays off; the null half is no longer run
                previous = tokens[:, step - 1 : step]  # [B, 1]
                if guided:
                    previous = torch.cat([previous, previous])  # same token to both halves
                position = prefix + step - 1
                input_pos = torch.tensor([position], device=device)
                logits = decode_step(model, previous, input_pos, position + 1)
                tokens[:, step] = pick(logits, step, guided)
    finally:
        model.train(was_training)
    return tokens.clone()  # a normal tensor, usable outside inference mode
