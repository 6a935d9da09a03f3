"""Small, shared file helpers: atomic writes, hashing, safe checkpoint loading."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it over `final_path` only if the block succeeds.

    A reader (or a rerun after kill -9) never sees a half-written file: either the old file or the new one.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_torch_weights(path: str | os.PathLike) -> Any:
    """Load a PyTorch checkpoint without executing pickled code (weights_only=True)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad or unsafe files
        raise ValueError(
            f"cannot load checkpoint {path} safely (weights_only=True): {error}. "
            "Is it a PyTorch weights file (e.g. an official LlamaGen .pt)?"
        ) from error


def check_output_file(path: str | os.PathLike, flag: str, kind: str, is_kind, inputs=(), overwrite: bool = False
                      ) -> Path:
    """Before any work: `path` may be written as this command's `kind` of output. Refused (ValueError naming the
    flag and the file) when it is a folder, one of the command's `inputs`, or an existing file that `is_kind` does
    not recognise as this kind of output (a manifest, a checkpoint, someone's data), unless `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file name for the {kind}")
    for source in inputs:
        if source and Path(source).exists() and path.exists() and os.path.samefile(path, source):
            raise ValueError(f"{flag} {path} is an input of this command: writing the {kind} there would destroy "
                             "it; choose another path")
    if path.exists() and not overwrite and not is_kind(path):
        raise ValueError(f"{flag} {path} exists and is not a {kind} written by this tool: choose another path, or "
                         "pass --overwrite to replace it")
    return path


def is_json_with(path: Path, *keys: str) -> bool:
    """Whether `path` holds a JSON object with every one of `keys` (how our JSON outputs are recognised)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and all(key in record for key in keys)


SOFTWARE = "star"  # the PNG text chunk that says this tool wrote the image


def signed_png_info():
    """PNG text chunks that mark an image as written by this tool."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", SOFTWARE)
    return info


def is_star_png(path: str | os.PathLike) -> bool:
    """Whether `path` is a PNG this tool wrote (an output it may replace)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == SOFTWARE
    except (OSError, ValueError):
        return False
