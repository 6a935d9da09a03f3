"""The token-shard format: the contract between stage one (tokenize) and stage two (train).

A dataset is a folder with `manifest.json` and WebDataset `.tar` shards. One sample per source image:
`__key__` (normalised relative path), `tokens.npy` (uint16 or int32 `[V, h, w]`), `cls` (class id as text) and
`json` (per view: crop box `[x0, y0, x1, y1]` in source pixels and the flip flag; plus the source size).
Each shard has a sidecar `shard-NNNNNN.json` (its sample count, keys and rejected inputs). The sidecar is
renamed into place after the tar, so "sidecar exists" means "shard complete": a rerun after a crash redoes only
shards without one.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from star.io import atomic_path, write_json_atomic

FORMAT_NAME = "star-token-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sidecar_path(tar_path: Path) -> Path:
    return tar_path.with_suffix(".json")


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def normalise_key(relative_path: str) -> str:
    """A WebDataset-safe key: WebDataset splits a member name at the first '.', so dots become '_'."""
    return relative_path.replace(os.sep, "/").replace(".", "_")


@dataclass
class ShardSample:
    key: str
    tokens: np.ndarray  # [V, h, w]
    class_id: int
    views: list[dict]  # [{"box": [x0, y0, x1, y1], "flip": bool}, ...]
    source_size: tuple[int, int]  # (width, height)
    source: str = ""  # the input's relative path or tar member, for people reading the shard


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # stable bytes for stable inputs
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def encode_sample_members(sample: ShardSample) -> list[tuple[str, bytes]]:
    buffer = io.BytesIO()
    np.save(buffer, sample.tokens, allow_pickle=False)
    meta = {"views": sample.views, "source_size": list(sample.source_size), "source": sample.source}
    return [
        (f"{sample.key}.tokens.npy", buffer.getvalue()),
        (f"{sample.key}.cls", str(int(sample.class_id)).encode()),
        (f"{sample.key}.json", json.dumps(meta).encode()),
    ]


class ShardWriter:
    """Writes one shard under a temporary name; `close()` renames the tar, then its sidecar, into place."""

    def __init__(self, tar_path: Path, process_index: int = 0):
        self.tar_path = Path(tar_path)
        self.process_index = process_index
        self._tar_context = atomic_path(self.tar_path)
        self._tmp_path = self._tar_context.__enter__()
        self._tar = tarfile.open(self._tmp_path, "w")
        self.keys: list[str] = []
        self.class_ids: set[int] = set()
        self.rejected: list[dict] = []

    def write(self, sample: ShardSample) -> None:
        for name, payload in encode_sample_members(sample):
            _add_member(self._tar, name, payload)
        self.keys.append(sample.key)
        self.class_ids.add(int(sample.class_id))

    def reject(self, source: str, reason: str) -> None:
        self.rejected.append({"path": source, "reason": reason})

    def close(self) -> dict:
        self._tar.close()
        self._tar_context.__exit__(None, None, None)
        sidecar = {"file": self.tar_path.name, "samples": len(self.keys), "process": self.process_index, "keys": self.keys,
                   "class_ids": sorted(self.class_ids), "rejected": self.rejected}
        write_json_atomic(sidecar_path(self.tar_path), sidecar)
        return sidecar

    def abort(self) -> None:
        self._tar.close()
        self._tar_context.__exit__(RuntimeError, RuntimeError("aborted"), None)


def shard_is_complete(tar_path: Path) -> bool:
    return tar_path.is_file() and sidecar_path(tar_path).is_file()


def iter_shard(tar_path: str | Path) -> Iterator[dict]:
    """Read one shard without webdataset (used by --inspect and the map-style cache): dicts of the members."""
    tar_path = Path(tar_path)
    current_key, current = None, {}
    try:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, extension = member.name.partition(".")
                if key != current_key:
                    if current:
                        yield current
                    current_key, current = key, {"__key__": key}
                current[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"shard {tar_path} is unreadable or truncated ({error}); delete it and its .json sidecar, "
                         "then rerun the same tokenize command to rebuild only that shard") from error
    if current:
        yield current


def decode_sample(members: dict) -> ShardSample:
    tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
    meta = json.loads(members["json"])
    return ShardSample(
        key=members["__key__"],
        tokens=tokens,
        class_id=int(members["cls"]),
        views=meta["views"],
        source_size=tuple(meta["source_size"]),
        source=meta.get("source", ""),
    )


@dataclass
class Manifest:
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {folder} a token-shard folder written by tokenize/run.py?")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a {FORMAT_NAME} manifest (format={data.get('format')!r})")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} has format_version {data['format_version']}; this code reads up to {FORMAT_VERSION}")
        return cls(data)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.data["grid"])

    @property
    def codebook_size(self) -> int:
        return int(self.data["codebook_size"])

    @property
    def num_classes(self) -> int:
        return len(self.data["classes"])

    @property
    def num_views(self) -> int:
        return int(self.data["views"]["num_views"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.data["tokenizer"]["checkpoint_sha256"]

    def shard_paths(self, folder: str | Path) -> list[Path]:
        return [Path(folder) / entry["file"] for entry in self.data["shards"]]
