"""Class-conditional sampling with a preallocated KV cache and classifier-free guidance (LlamaGen's generate).

The functions carry LlamaGen's names and roles (`prefill`, `decode_one_token`, `decode_n_tokens`, `generate`),
so the two files can be read side by side. CFG runs as ONE batched forward on [cond; null] (conditional half
first, null label = num_classes); the guided logits are uncond + s * (cond - uncond) and the same sampled token
is fed to both halves. Differences from LlamaGen, on purpose: CFG is on whenever cfg_scale != 1 (LlamaGen: > 1);
the scale may follow a schedule over the steps; once `cfg_interval` switches CFG off, only the conditional half
is run (LlamaGen keeps computing the null half and discards it).

Two decode modes, the same tokens:
- "dynamic": attention reads only the filled cache slots (shapes grow by one per token); fastest eagerly, CPU.
- "static": every step attends over the whole preallocated cache under a mask built on the device from
  `input_pos`, which is advanced in place: fixed shapes and no host sync per token, so the step can be captured
  as a CUDA graph (`torch.compile(mode="reduce-overhead")`). "auto" picks static on CUDA, dynamic elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from star.gpt.model import GPT

DECODE_MODES = ("auto", "static", "dynamic")
CFG_SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class SamplingSettings:
    """How tokens are drawn (LlamaGen's **sampling_kwargs), the CFG scale and schedule, and the decode mode: what
    `generate` takes, declared once. Its fields are flags of `evaluate/run.py sample`, whose help the command
    gives (star/eval/sample.py). Checked on creation."""

    cfg_scale: float = 1.0  # classifier-free guidance scale (1.0 = off)
    cfg_schedule: str = "constant"  # one of CFG_SCHEDULES: the guidance over the steps
    cfg_interval: int = -1  # LlamaGen's cfg-interval: CFG off after this decode step (-1 = never)
    temperature: float = 1.0
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0  # 1.0 = no nucleus filter
    decode: str = "auto"  # one of DECODE_MODES
    compile_decode: bool = False  # torch.compile the decode step

    def __post_init__(self) -> None:
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"--cfg-scale {self.cfg_scale} must be a finite number (1.0 = no guidance)")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"--cfg-schedule {self.cfg_schedule!r}; choose one of {', '.join(CFG_SCHEDULES)}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature {self.temperature} must be >= 0 (values near 0 are ~greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k} must be >= 0 (0 = no top-k filter)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p {self.top_p} must be in (0, 1] (1.0 = no nucleus filter)")
        if self.cfg_interval < -1:
            raise ValueError(f"--cfg-interval {self.cfg_interval} must be >= -1 (-1 = CFG at every step)")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"--decode {self.decode!r}; choose one of {', '.join(DECODE_MODES)}")

    def cfg_scale_at(self, step: int, num_steps: int) -> float:
        """Guidance scale for image token `step` (0-based) of `num_steps`.

        constant: cfg_scale at every step. linear: 1 + (cfg_scale - 1) * step / (num_steps - 1), i.e. 1 for the
        first token rising to cfg_scale for the last one.
        """
        if self.cfg_schedule == "linear" and num_steps > 1:
            return 1.0 + (self.cfg_scale - 1.0) * step / (num_steps - 1)
        return self.cfg_scale

    def decode_mode(self, device: torch.device) -> str:
        """"static" or "dynamic": `decode` with "auto" resolved (static on CUDA, dynamic elsewhere)."""
        if self.decode == "auto":
            return "static" if device.type == "cuda" else "dynamic"
        return self.decode


def sample_logits(logits: torch.Tensor, sampling: SamplingSettings,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample one token per row of logits [B, V] with `sampling`'s temperature, top_k and top_p; returns [B] int64.

    temperature: logits are divided by max(temperature, 1e-5) (LlamaGen's guard; ~greedy near 0).
    top_k: keep the k largest logits (ties with the k-th kept); 0 = no top-k filter; 1 = argmax.
    top_p: keep the most likely tokens until their total probability exceeds top_p (the token that crosses
    the threshold is kept); 1.0 = no filter. At least one token always survives.
    generator: must live on the logits' device.
    The values are checked once, when `sampling` is made.
    """
    top_k, top_p = sampling.top_k, sampling.top_p
    if top_k == 1:
        return logits.argmax(dim=-1)  # exact greedy, no random draw
    logits = logits.float() / max(sampling.temperature, 1e-5)  # [B, V]
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


def guided_logits(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """[2B, V] logits of [cond; null] -> [B, V] uncond + s * (cond - uncond)."""
    cond_logits, uncond_logits = torch.split(logits, len(logits) // 2, dim=0)
    return uncond_logits + (cond_logits - uncond_logits) * cfg_scale


def model_step(model: GPT, tokens: Optional[torch.Tensor], labels: Optional[torch.Tensor], input_pos: torch.Tensor,
               cache_len: Optional[int]) -> torch.Tensor:
    """The one model call of sampling: new positions (class labels and/or tokens) at input_pos -> the last one's
    next-token logits [B, V]. cache_len: the filled cache slots to attend (dynamic), or None (static)."""
    return model.forward_cached(tokens, labels, input_pos, cache_len)[:, -1]


_compiled_steps: dict[str, Callable] = {}


def decode_step_function(mode: str, compile_decode: bool) -> Callable:
    """`model_step`, compiled once per mode when asked (dynamic shapes for the growing cache; CUDA graphs for
    the static one)."""
    if not compile_decode:
        return model_step
    if mode not in _compiled_steps:
        if mode == "static":
            _compiled_steps[mode] = torch.compile(model_step, mode="reduce-overhead", fullgraph=True)
        else:
            _compiled_steps[mode] = torch.compile(model_step, dynamic=True)
    return _compiled_steps[mode]


@dataclass
class Decoder:
    """What every decode step shares: the sampling settings, the random generator, the (compiled) `model_step`,
    and the decode mode (static: attend the whole cache, passing cache_len None)."""

    sampling: SamplingSettings
    generator: Optional[torch.Generator]
    step: Callable
    static: bool

    def cache_len(self, position: Optional[int]) -> Optional[int]:
        return None if self.static else position + 1


def prefill(model: GPT, cond_idx: torch.Tensor, input_pos: torch.Tensor, cfg_scale: float, cfg_flag: bool,
            decoder: Decoder) -> torch.Tensor:
    """The class position(s) -> the first image token [B]. cfg_flag: cond_idx is [cond; null] ([2B])."""
    logits = model_step(model, None, cond_idx, input_pos, decoder.cache_len(len(input_pos) - 1))  # [B or 2B, V]
    if cfg_flag:
        logits = guided_logits(logits, cfg_scale)
    return sample_logits(logits, decoder.sampling, decoder.generator)


def decode_one_token(model: GPT, x: torch.Tensor, input_pos: torch.Tensor, cfg_scale: float, cfg_flag: bool,
                     decoder: Decoder, cache_len: Optional[int]) -> torch.Tensor:
    """Previous tokens x [B, 1] -> next tokens [B]. cfg_flag: run [x; x] through the cond and null halves."""
    if cfg_flag:
        x_combined = torch.cat([x, x])  # the same token to both halves
        logits = guided_logits(decoder.step(model, x_combined, None, input_pos, cache_len), cfg_scale)
    else:
        logits = decoder.step(model, x, None, input_pos, cache_len)  # [B, V]
    return sample_logits(logits, decoder.sampling, decoder.generator)


def decode_n_tokens(model: GPT, cur_token: torch.Tensor, input_pos: torch.Tensor, num_new_tokens: int,
                    cfg_scale: float, cfg_interval: int, decoder: Decoder) -> list[torch.Tensor]:
    """Tokens 1..num_new_tokens after cur_token [B, 1], one per call of decode_one_token; [B, 1] each.

    input_pos [1] starts at the first decode position and is advanced in place on the device; the dynamic
    mode also tracks the position on the host (its cache slice length), the static mode never reads it back.
    """
    new_tokens = []
    cfg_flag = cfg_scale != 1.0
    static = decoder.static
    position = int(input_pos[0]) if not static else None  # one read, before the loop
    num_image_tokens = num_new_tokens + 1
    for i in range(num_new_tokens):
        if cfg_interval > -1 and i > cfg_interval:
            cfg_flag = False  # once off, CFG stays off; the null half is no longer run
        scale = decoder.sampling.cfg_scale_at(i + 1, num_image_tokens)
        cache_len = decoder.cache_len(position)
        next_token = decode_one_token(model, cur_token, input_pos, scale, cfg_flag, decoder, cache_len)
        input_pos += 1
        if not static:
            position += 1
        new_tokens.append(next_token.clone()[:, None])  # clone: a CUDA graph reuses its output memory
        cur_token = new_tokens[-1]
    return new_tokens


def generate(
    model: GPT,
    labels: torch.Tensor,
    sampling: Optional[SamplingSettings] = None,
    generator: Optional[torch.Generator] = None,
    **settings,
) -> torch.Tensor:
    """Sample block_size image tokens per label; returns LongTensor [B, block_size] in raster order.

    labels: [B] class ids (moved to the model's device). `sampling` (or its fields as keywords: cfg_scale,
    cfg_schedule, cfg_interval, temperature, top_k, top_p, decode, compile_decode) says how. CFG is used when
    cfg_scale != 1.0: the batch becomes [cond; null] (2B rows) and logits = uncond + s_t * (cond - uncond),
    with s_t from `SamplingSettings.cfg_scale_at`. cfg_interval (LlamaGen): when > -1, CFG stops after decode step
    i > cfg_interval (i.e. from image token cfg_interval + 2 on); from then on only the conditional half is run.
    The prefill (token 0) always uses CFG. Deterministic for a given generator (on the model's device).
    decode: "auto" | "static" | "dynamic" (see the module docstring; both give the same tokens).
    compile_decode: torch.compile the decode step (CUDA graphs in static mode). The model runs in eval mode;
    its previous mode is restored.
    """
    if sampling is None:
        sampling = SamplingSettings(**settings)
    elif settings:
        raise TypeError(f"generate: give `sampling` or its fields, not both ({', '.join(settings)})")
    config = model.config
    num_tokens = config.block_size
    device = model.tok_embeddings.weight.device
    cfg_scale = sampling.cfg_scale
    static = sampling.decode_mode(device) == "static"
    step = decode_step_function("static" if static else "dynamic", sampling.compile_decode)
    decoder = Decoder(sampling, generator, step, static)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cond = labels.to(device=device, dtype=torch.long)  # [B]
            if cfg_scale != 1.0:
                cond_null = torch.full_like(cond, config.null_class)
                cond_combined = torch.cat([cond, cond_null])  # [2B], cond first
            else:
                cond_combined = cond
            prefix = config.cls_token_num  # T in LlamaGen
            model.setup_kv_cache(len(cond_combined), prefix + num_tokens, model.tok_embeddings.weight.dtype, device)

            seq = torch.empty(len(cond), num_tokens, dtype=torch.long, device=device)  # [B, N]
            input_pos = torch.arange(0, prefix, device=device)
            first_scale = sampling.cfg_scale_at(0, num_tokens)
            next_token = prefill(model, cond_combined, input_pos, first_scale, cfg_scale != 1.0, decoder)  # [B]
            seq[:, 0] = next_token

            input_pos = torch.tensor([prefix], device=device, dtype=torch.long)
            generated_tokens = decode_n_tokens(model, next_token[:, None], input_pos, num_tokens - 1, cfg_scale,
                                               sampling.cfg_interval, decoder)
            if generated_tokens:
                seq[:, 1:] = torch.cat(generated_tokens, dim=1)
    finally:
        model.train(was_training)
    return seq.clone()  # a normal tensor, usable outside inference mode
