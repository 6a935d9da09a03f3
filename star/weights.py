"""Loading weights we did not write: official LlamaGen checkpoints (every container they come in), strictly,
with errors that name the file, the config and the keys that do not fit (strict loading is shared by the GPT
and the VQ)."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from star.gpt.model import GPT, GPTConfig
from star.io import load_torch_weights

# ---------------------------------------------------------------------------------------------------------
# Strict state-dict loading with errors that name the keys (shared by the GPT and the VQ)
# ---------------------------------------------------------------------------------------------------------


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any],
                        ignore: Sequence[str] = ()) -> list[str]:
    """One line per kind of problem (shape mismatches, missing keys, unexpected keys); empty when it fits."""
    def shape(tensor) -> tuple:
        return tuple(tensor.shape)

    def listed(items: list[str]) -> str:
        return ", ".join(items[:4]) + (", ..." if len(items) > 4 else "")

    missing = [k for k in expected if k not in given and k not in ignore]
    unexpected = [k for k in given if k not in expected and k not in ignore]
    mismatched = [k for k in expected if k in given and shape(given[k]) != shape(expected[k])]
    lines = []
    if mismatched:
        lines.append(f"  shape mismatches: {len(mismatched)} ("
                     + listed([f"{k}: checkpoint {shape(given[k])} vs model {shape(expected[k])}" for k in mismatched]) + ")")
    if missing:
        lines.append(f"  missing keys: {len(missing)} (" + listed([f"{k} {shape(expected[k])}" for k in missing]) + ")")
    if unexpected:
        lines.append(f"  unexpected keys: {len(unexpected)} (" + listed([f"{k} {shape(given[k])}" for k in unexpected])
                     + ")")
    return lines


def raise_if_mismatched(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any], header: str, advice: str,
                        ignore: Sequence[str] = ()) -> None:
    """ValueError("header:\\n  <problems>\\n  advice") unless `given` has exactly `expected`'s keys and shapes."""
    problems = state_dict_mismatch(expected, given, ignore)
    if problems:
        raise ValueError("\n".join([f"{header}:", *problems, f"  {advice}"]))


def _gpt_mismatch_hint(config: GPTConfig, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Guess which config field differs from the checkpoint's tensor shapes."""
    hints = []
    tok = state_dict.get("tok_embeddings.weight")
    if tok is not None and tok.ndim == 2:
        if tok.shape[0] != config.vocab_size:
            hints.append(f"vocab_size differs (checkpoint {tok.shape[0]}, config {config.vocab_size})")
        if tok.shape[1] != config.dim:
            hints.append(f"dim differs (checkpoint {tok.shape[1]}, config {config.dim}): wrong preset?")
    cls_table = state_dict.get("cls_embedding.embedding_table.weight")
    if cls_table is not None and cls_table.shape[0] != config.num_classes + 1:
        hints.append(f"num_classes differs (checkpoint table has {cls_table.shape[0]} rows = {cls_table.shape[0] - 1} "
                     f"classes + null, config num_classes={config.num_classes})")
    layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.", k))}
    if layer_ids and max(layer_ids) + 1 != config.n_layer:
        hints.append(f"n_layer differs (checkpoint {max(layer_ids) + 1}, config {config.n_layer}): wrong preset?")
    w1 = state_dict.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and w1.shape[0] != config.ffn_hidden_dim and tok is not None and tok.shape[1] == config.dim:
        hints.append(f"FFN width differs (checkpoint {w1.shape[0]}, config {config.ffn_hidden_dim}): check "
                     "multiple_of / ffn_dim_multiplier")
    if not hints:
        hints.append("the checkpoint is not a LlamaGen c2i GPT of this size (t2i checkpoints have other keys)")
    return "; ".join(hints)


def load_state_dict_strict(model: GPT, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with an error naming the file, the config and the offending keys."""
    c = model.config
    raise_if_mismatched(model.state_dict(), state_dict,
                        header=f"checkpoint {source} does not fit GPT config (dim={c.dim}, n_layer={c.n_layer}, "
                               f"n_head={c.n_head}, vocab_size={c.vocab_size}, num_classes={c.num_classes}, "
                               f"block_size={c.block_size})",
                        advice=f"likely cause: {_gpt_mismatch_hint(c, state_dict)}")
    model.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------------------
# Official LlamaGen checkpoints
# ---------------------------------------------------------------------------------------------------------

_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key.replace("._fsdp_wrapped_module.", ".").replace("._checkpoint_wrapped_module.", ".")


def clean_llamagen_state_dict(raw: Mapping[str, Any], source: str = "<state_dict>") -> dict[str, torch.Tensor]:
    """Unwrap {"model"|"module"|"state_dict": sd} or a raw sd; strip wrapper prefixes; drop non-weights."""
    state = raw
    for container in ("model", "module", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(container), Mapping):
            state = state[container]
            break
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{source}: no state dict found (expected a dict of tensors or one under 'model')")
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor; is this a GPT "
                             "weights file?")
        key = _strip_prefixes(key)
        if key == "freqs_cis" or key == "causal_mask" or ".kv_cache." in key or key.startswith("kv_cache."):
            continue  # rebuilt at run time, never weights
        cleaned[key] = value
    return cleaned


def load_llamagen_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict from an official LlamaGen .pt (DDP {"model": sd}, deepspeed, FSDP raw) or a .safetensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        raw = load_file(str(path))
    else:
        raw = load_torch_weights(path)
    return clean_llamagen_state_dict(raw, source=str(path))


def _warn_if_name_disagrees_with_block_size(path: Path, config: GPTConfig) -> None:
    match = re.search(r"_(256|384|512)(?:\D|$)", path.name)
    if match:
        expected = (int(match.group(1)) // 16) ** 2
        if expected != config.block_size:
            warnings.warn(f"{path.name} looks like a {match.group(1)}-px checkpoint ({expected} tokens) but "
                          f"block_size={config.block_size}; resolution is not stored in the weights, so set "
                          f"block_size={expected} unless this is intended", stacklevel=3)


def load_llamagen_gpt(path: str | Path, config: GPTConfig | str | Path | Mapping[str, Any]) -> GPT:
    """Build a GPT for `config` and load an official LlamaGen checkpoint (or FSDP raw dict) STRICTLY.

    The resolution (block_size) is not stored in the weights: a 384-px checkpoint (576 tokens) loads into
    a 256-px config without a shape error. Pick block_size from the checkpoint name. Returns eval mode.
    """
    config = GPTConfig.resolve(config)
    _warn_if_name_disagrees_with_block_size(Path(path), config)
    state_dict = load_llamagen_state_dict(path)
    model = GPT(config)
    load_state_dict_strict(model, state_dict, source=str(path))
    return model.eval()
