"""LlamaGen's GPT configuration (`ModelArgs`, same field names and defaults) and its named presets.

`GPTConfig.resolve` is the one way to get a config: a size name ('GPT-B' or 'B', 'GPT-tiny'), a JSON file, a dict or a
GPTConfig, plus overrides. JSON may hold the fields directly or under "config" (our checkpoints and the
fixtures); that wrapper is unwrapped in one place (`_fields_of`). Sizes are checked on construction, so a
config of 10^6 layers or a negative width is one line, not a 12 TB allocation.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

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
# Not LlamaGen's: a size a CPU trains in minutes (the study's and the demo's GPT: dim 128, 4 layers, FFN width
# rounded to 64 so it stays 384 rather than 512).
SMALL_PRESETS: dict[str, dict[str, int]] = {
    "GPT-tiny": dict(n_layer=4, n_head=4, dim=128, multiple_of=64),
}
# Every size `--model` takes by name; vocabulary, grid and classes come from elsewhere (the defaults, or the data).
MODEL_SIZES: dict[str, dict[str, int]] = {**GPT_PRESETS, **SMALL_PRESETS}
_SIZE_BY_KEY = {name.upper(): name for name in MODEL_SIZES}

# LlamaGen ModelArgs fields that have no meaning for this c2i model; accepted in config files and ignored.
_IGNORED_LLAMAGEN_FIELDS = ("caption_dim", "max_batch_size", "max_seq_len")


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n (LlamaGen's rounding of the FFN width)."""
    return n if n % k == 0 else n + k - (n % k)


def preset_name(spec: str) -> Optional[str]:
    """Canonical size name for 'GPT-B', 'gpt-b', 'B', 'tiny', ...; None when `spec` is not a size."""
    key = spec.strip().upper()
    if not key.startswith("GPT-"):
        key = "GPT-" + key
    return _SIZE_BY_KEY.get(key)


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
        _check_sizes(self)
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
        values = _fields_of(values)
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
            base, source = _fields_of(spec), "<dict>"
        else:
            name = preset_name(str(spec)) if isinstance(spec, str) else None
            if name is not None:
                base, source = dict(MODEL_SIZES[name]), name
            else:
                path = Path(spec)
                if not path.is_file():
                    raise FileNotFoundError(
                        f"GPT config {str(spec)!r} is neither a size ({', '.join(MODEL_SIZES)}) nor an existing "
                        "JSON file"
                    )
                try:
                    base = json.loads(path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise ValueError(f"GPT config {path} is not a JSON config file ({type(error).__name__}): give "
                                     "a preset or a JSON of LlamaGen ModelArgs fields") from error
                source = str(path)
                if not isinstance(base, Mapping):
                    raise ValueError(f"GPT config file {path} must hold a JSON object, got {type(base).__name__}")
                base = _fields_of(base)
        unknown = sorted(set(overrides) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"GPT config overrides {unknown} are not fields; known fields: {cls.field_names()}")
        base = dict(base)
        if "n_head" in overrides and "n_kv_head" not in overrides and base.get("n_kv_head") == base.get("n_head"):
            base["n_kv_head"] = None  # plain multi-head attention follows the new n_head
        base.update(overrides)
        return cls.from_dict(base, source=source)


def _fields_of(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields of a record: itself, or its "config" entry ({"config": {...}, "note": ...})."""
    values = dict(values)
    return dict(values["config"]) if isinstance(values.get("config"), Mapping) else values


# Far beyond any model this code trains (LlamaGen's largest, 7B, has dim 4096 and 32 layers), small enough that a
# config past them is a typo rather than a plan: refused before anything is allocated.
MAX_DIM, MAX_LAYERS, MAX_VOCAB, MAX_CLASSES, MAX_BLOCK = 65536, 1024, 1 << 22, 1 << 20, 1 << 16
MAX_PARAMETERS = 200e9


def _check_sizes(config: "GPTConfig") -> None:
    limits = {"dim": MAX_DIM, "n_layer": MAX_LAYERS, "n_head": MAX_DIM, "vocab_size": MAX_VOCAB,
              "num_classes": MAX_CLASSES, "block_size": MAX_BLOCK, "multiple_of": MAX_DIM}
    for name, limit in limits.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"GPTConfig: {name}={value!r} must be an integer from 1 to {limit}")
    if config.n_kv_head is not None and (isinstance(config.n_kv_head, bool) or not isinstance(config.n_kv_head, int)
                                         or config.n_kv_head < 1):
        raise ValueError(f"GPTConfig: n_kv_head={config.n_kv_head!r} must be a positive integer (or null)")
    for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate",
                 "class_dropout_prob"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"GPTConfig: {name}={value!r} must be a number in [0, 1]")
    parameters = (config.n_layer * (4 * config.dim**2 + 3 * config.dim * config.ffn_hidden_dim)
                  + 2 * config.vocab_size * config.dim)
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"GPTConfig: dim={config.dim}, n_layer={config.n_layer}, vocab_size={config.vocab_size} "
                         f"make {parameters / 1e9:.0f}B parameters (more than {MAX_PARAMETERS / 1e9:.0f}B): a typo?")
