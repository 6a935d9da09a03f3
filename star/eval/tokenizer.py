"""The tokenizer a generator was trained with, as its run recorded it, and the one evaluation decodes with.

train/run.py writes into the run's config.json the VQ checkpoint the shards were made with (an absolute path),
its sha256 and its config (all three from the shards' manifest); each checkpoint's meta.json repeats the sha256.
`find_tokenizer` gives the VQ to decode with: --vq-ckpt when given, else the recorded file; its config from
--vq-config when given, else the recorded config (when it is the recorded file), else the JSON beside the file,
else LlamaGen's VQ-16. A VQ other than the recorded one is refused unless allowed: its codes mean other images.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from star.checkpoint_folder import RUN_CONFIG
from star.io import sha256_file
from star.train.run_folder import read_meta


@dataclass(frozen=True)
class RecordedTokenizer:
    """What a run recorded about its tokenizer; empty fields were not recorded."""

    sha256: str | None
    checkpoint: str = ""  # absolute path at training time
    config: dict = field(default_factory=dict)  # VQConfig fields
    record: str = ""  # the file that says so (the run's config.json)


@dataclass(frozen=True)
class DecoderChoice:
    """The VQ evaluation decodes with, and how it was chosen (written to settings.json)."""

    checkpoint: Path
    config: object  # a VQConfig
    found: str  # "--vq-ckpt" or "recorded in RUN/config.json"
    config_from: str
    check: str  # the sha256 comparison with the run's record


def _run_record(checkpoint_file: Path) -> tuple[Path, dict] | None:
    """(path, contents) of the config.json of the run that holds this checkpoint file (RUN/checkpoints/step-N/
    FILE); None when the file is not inside a run (an official .pt, a bare checkpoint folder)."""
    path = checkpoint_file.parent.parent.parent / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return (path, record) if isinstance(record, dict) and isinstance(record.get("settings"), dict) else None


def _config_from_manifest(record: dict) -> dict:
    """A run recorded before its config.json held the VQ config: the one in its shards' manifest, if readable."""
    from star.data.manifest import Manifest

    shards = record["settings"].get("shards")
    if not isinstance(shards, str) or not Path(shards).is_dir():  # local folders only: no network here
        return {}
    try:
        return dict(Manifest.load(shards).tokenizer.get("config") or {})
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def recorded_tokenizer(checkpoint_file: Path) -> RecordedTokenizer | None:
    """The tokenizer the checkpoint's training shards were made with (the checkpoint folder's meta.json for the
    sha256, the run's config.json for the file and config); None where nothing is recorded."""
    folder = checkpoint_file.parent
    sha256 = read_meta(folder).tokenizer_sha256 if (folder / "meta.json").is_file() else None
    found = _run_record(checkpoint_file)
    if found is None:
        return RecordedTokenizer(sha256) if sha256 else None
    path, record = found
    recorded_sha = record.get("tokenizer_sha256")
    sha256 = sha256 or (recorded_sha if isinstance(recorded_sha, str) and recorded_sha else None)
    checkpoint = record.get("tokenizer_checkpoint") or ""
    config = record.get("tokenizer_config") or _config_from_manifest(record)
    return RecordedTokenizer(sha256, str(checkpoint), dict(config), str(path))


def _recorded_file(recorded: RecordedTokenizer | None, checkpoint_file: Path) -> Path:
    """The recorded VQ file, or one line naming --vq-ckpt when there is none or it has moved."""
    if recorded is None or not recorded.checkpoint:
        raise ValueError(f"--vq-ckpt: {checkpoint_file} records no tokenizer file (not inside a run of train/run.py): "
                         "pass --vq-ckpt (and --vq-config), or --tokens-only")
    path = Path(recorded.checkpoint)
    if not path.is_file():
        sha = f" (sha256 {recorded.sha256[:12]}...)" if recorded.sha256 else ""
        raise FileNotFoundError(f"--vq-ckpt: the run's tokenizer {path}{sha}, recorded in {recorded.record}, is not "
                                "there any more: pass --vq-ckpt with where it is now")
    return path


def compare_with_record(path: Path, recorded: RecordedTokenizer | None, allow_other: bool,
                        checkpoint_file: Path) -> tuple[bool, str]:
    """(whether `path` is the recorded tokenizer, what was found). Another VQ is refused unless `allow_other`
    (then a warning): the model's tokens would decode into other images."""
    if recorded is None or not recorded.sha256:
        return False, "not recorded in the checkpoint (not checked)"
    actual = sha256_file(path)
    if actual == recorded.sha256:
        return True, "matches the checkpoint's tokenizer_sha256"
    message = (f"--vq-ckpt {path} (sha256 {actual[:12]}) is not the tokenizer {checkpoint_file} was trained with "
               f"(sha256 {recorded.sha256[:12]})")
    if not allow_other:
        raise ValueError(message + ": give that VQ checkpoint, or --allow-other-tokenizer to sample anyway")
    warnings.warn(message + "; sampling anyway (--allow-other-tokenizer)", stacklevel=3)
    return False, f"differs from the checkpoint's ({recorded.sha256}); allowed"


def _decoder_config(vq_config: str, path: Path, recorded: RecordedTokenizer | None, is_recorded: bool):
    """(VQConfig, where it came from): --vq-config, the run's record, the JSON beside the file, or VQ-16."""
    from star.vq.model import VQConfig

    if vq_config:
        return VQConfig.resolve(vq_config), "--vq-config"
    if is_recorded and recorded is not None and recorded.config:
        return VQConfig.from_dict(recorded.config, source=recorded.record or "the run's record"), "the run's record"
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        return VQConfig.resolve(sidecar), str(sidecar)
    return VQConfig.resolve("VQ-16"), "VQ-16 (LlamaGen's default; pass --vq-config for another)"


def find_tokenizer(vq_ckpt: str, vq_config: str, checkpoint_file: Path, allow_other: bool = False) -> DecoderChoice:
    """The VQ that decodes `checkpoint_file`'s tokens (see the module's docstring); checked against the run's
    record before anything is loaded."""
    recorded = recorded_tokenizer(checkpoint_file)
    if vq_ckpt:
        path, found = Path(vq_ckpt), "--vq-ckpt"
        if not path.is_file():
            raise FileNotFoundError(f"--vq-ckpt {vq_ckpt} not found")
    else:
        path = _recorded_file(recorded, checkpoint_file)
        found = f"recorded in {recorded.record}"
    is_recorded, check = compare_with_record(path, recorded, allow_other, checkpoint_file)
    config, config_from = _decoder_config(vq_config, path, recorded, is_recorded)
    return DecoderChoice(path, config, found, config_from, check)


def check_shards_tokenizer(shards: str, checkpoint_file: Path, allow_other: bool) -> str:
    """Shards made by a VQ other than the one the run recorded hold codes the model never learned: refused
    (a warning with `allow_other`). Returns what was found."""
    from star.data.manifest import Manifest

    recorded = recorded_tokenizer(checkpoint_file)
    if recorded is None or not recorded.sha256:
        return "not recorded in the checkpoint (not checked)"
    actual = Manifest.load(shards).tokenizer_sha256
    if actual == recorded.sha256:
        return "matches the checkpoint's tokenizer_sha256"
    message = (f"--shards {shards} were tokenized by a VQ with sha256 {actual[:12]}, {checkpoint_file} was trained "
               f"on tokens of sha256 {recorded.sha256[:12]}")
    if not allow_other:
        raise ValueError(message + ": tokenize them with the run's VQ, or pass --allow-other-tokenizer")
    warnings.warn(message + "; scoring anyway (--allow-other-tokenizer)", stacklevel=3)
    return f"differs from the checkpoint's ({recorded.sha256}); allowed"
