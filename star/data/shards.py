"""The token-shard format: the contract between stage one (tokenize) and stage two (train).

A dataset is a folder with `manifest.json` and WebDataset `.tar` shards. One sample per source image:
`__key__` (normalised relative path), `tokens.npy` (uint16 or int32 `[V, h, w]`), `cls` (class id as text) and
`json` (per view: crop box `[x0, y0, x1, y1]` in source pixels and the flip flag; plus the source size).
Each shard has a sidecar `shard-NNNNNN.json` (its sample count, keys and rejected inputs). The sidecar is
renamed into place after the tar, so "sidecar exists" means "shard complete": a rerun after a crash redoes only
shards without one.

This module owns the format: `Manifest` (typed; `load`, `write`, `verify`, `iter_samples`), the one tar member
grouper (`iter_tar_groups`, WebDataset's key rule) and the one shard reader (`iter_samples`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import socket
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

FORMAT_NAME = "star-token-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
SHARD_PATTERN = re.compile(r"^shard-\d{6}\.(tar|json)$")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sidecar_path(tar_path: Path) -> Path:
    return tar_path.with_suffix(".json")


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def normalise_key(relative_path: str) -> str:
    """A WebDataset-safe key: WebDataset splits a member name at the first '.', so dots become '_'."""
    return relative_path.replace(os.sep, "/").replace(".", "_")


# ----------------------------------------------------------------------------------------------------------
# The one tar member grouper (input tars and token shards alike)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = directory + base name up to its first '.', extension = the rest (lower-cased)."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def iter_tar_groups(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: payload}) for each run of consecutive members sharing a key, in tar order.

    Raises the tar's own errors (tarfile.TarError, EOFError, OSError); callers say which file and what to do.
    """
    current_key, members = None, {}
    with tarfile.open(tar_path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, extension = split_member_name(member.name)
            if key != current_key:
                if members:
                    yield current_key, members
                current_key, members = key, {}
            members[extension] = tar.extractfile(member).read()
    if members:
        yield current_key, members


# ----------------------------------------------------------------------------------------------------------
# Samples


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


def _rebuild_hint(tar_path: Path) -> str:
    return (f"delete {tar_path.name} and its .json sidecar in {tar_path.parent}, then rerun the same tokenize "
            "command to rebuild only that shard")


def iter_shard(tar_path: str | Path) -> Iterator[dict]:
    """The member dicts (`__key__`, `tokens.npy`, `cls`, `json`) of one shard, read without webdataset."""
    tar_path = Path(tar_path)
    try:
        for key, members in iter_tar_groups(tar_path):
            yield {"__key__": key, **members}
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"shard {tar_path} is unreadable or truncated ({error}); {_rebuild_hint(tar_path)}") from error


def iter_samples(tar_paths: Iterable[str | Path]) -> Iterator[ShardSample]:
    """Every sample of the given shards, in order: the one shard-reading loop (the map cache, the probe and
    `inspect_shards` all read through it). A damaged shard raises ValueError naming it."""
    for tar_path in tar_paths:
        for members in iter_shard(tar_path):
            try:
                yield decode_sample(members)
            except (KeyError, ValueError) as error:
                raise ValueError(f"shard {tar_path}: sample {members.get('__key__')!r} is malformed ({error!r}); "
                                 f"{_rebuild_hint(Path(tar_path))}") from error


# ----------------------------------------------------------------------------------------------------------
# Writing one shard. Temporary files carry the writer's pid and host in their names, so a later run (holding
# the folder lock) removes only temporaries of writers that are provably dead, never a live process's files.

TEMP_PATTERN = re.compile(r"^\.(?P<final>shard-\d{6}\.(?:tar|json))\.pid(?P<pid>\d+)@(?P<host>[^/]+)\.tmp$")


def temp_path_for(final_path: Path) -> Path:
    return final_path.parent / f".{final_path.name}.pid{os.getpid()}@{socket.gethostname()}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_dead_writers_temporaries(folder: Path) -> list[Path]:
    """Delete `.shard-*.tmp` files written by a tokenize process of this host that no longer runs.

    Files of live processes, of other hosts, and any name this module does not write are left alone."""
    removed, host = [], socket.gethostname()
    for path in folder.glob(".shard-*.tmp"):
        match = TEMP_PATTERN.match(path.name)
        if match and match["host"] == host and not _pid_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def _owned_atomic_path(final_path: Path) -> Iterator[Path]:
    """Write to this process's named temporary beside `final_path`; fsync and rename it into place on success."""
    tmp_path = temp_path_for(final_path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, final_path)
    finally:
        tmp_path.unlink(missing_ok=True)


class ShardWriter:
    """Writes one shard under a temporary name; `close()` renames the tar, then its sidecar, into place."""

    def __init__(self, tar_path: Path, process_index: int = 0):
        self.tar_path = Path(tar_path)
        self.process_index = process_index
        self._tar_context = _owned_atomic_path(self.tar_path)
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
        sidecar = {"file": self.tar_path.name, "samples": len(self.keys), "process": self.process_index,
                   "keys": self.keys, "class_ids": sorted(self.class_ids), "rejected": self.rejected}
        with _owned_atomic_path(sidecar_path(self.tar_path)) as tmp:
            tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
        return sidecar

    def abort(self) -> None:
        self._tar.close()
        with contextlib.suppress(RuntimeError):
            self._tar_context.__exit__(RuntimeError, RuntimeError("aborted"), None)


def shard_is_complete(tar_path: Path) -> bool:
    return tar_path.is_file() and sidecar_path(tar_path).is_file()


def read_sidecar(tar_path: Path) -> dict:
    return json.loads(sidecar_path(tar_path).read_text())


# ----------------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class ShardEntry:
    file: str  # "shard-000000.tar", relative to the shard folder
    samples: int


@dataclass(frozen=True)
class RejectedInput:
    path: str  # the input's relative path, tar member or listing entry
    reason: str


@dataclass(frozen=True)
class ViewsRecord:
    policy: str  # "tencrop" | "center" | "random:N"
    num_views: int
    crop_range: float
    seed: int


@dataclass
class Manifest:
    """`manifest.json`, typed. Unknown keys of a newer writer are kept in `extra` and written back unchanged."""

    tokenizer: dict  # config, config_source, checkpoint, checkpoint_sha256
    image_size: int
    grid: tuple[int, int]
    codebook_size: int
    token_dtype: str
    views: ViewsRecord
    classes: dict[str, int]  # class name -> id
    shards: list[ShardEntry]
    rejected: list[RejectedInput]
    source: dict = field(default_factory=dict)  # kind, data, fingerprint
    command: str = ""
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""
    precision: str | None = None  # the encoder's resolved precision (absent in manifests before it was recorded)
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    folder: Path | None = field(default=None, compare=False)  # where it was loaded from or written to

    # -- derived values ---------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(entry.samples for entry in self.shards)

    @property
    def num_rejected(self) -> int:
        return len(self.rejected)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_views(self) -> int:
        return self.views.num_views

    @property
    def tokenizer_sha256(self) -> str:
        return self.tokenizer["checkpoint_sha256"]

    @property
    def tokenizer_checkpoint(self) -> str:
        return self.tokenizer.get("checkpoint", "")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.token_dtype)

    # -- (de)serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        record = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "tokenizer": self.tokenizer,
            "image_size": self.image_size,
            "grid": list(self.grid),
            "codebook_size": self.codebook_size,
            "token_dtype": self.token_dtype,
            "views": dataclasses.asdict(self.views),
            "classes": self.classes,
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "num_rejected": self.num_rejected,
            "shards": [dataclasses.asdict(entry) for entry in self.shards],
            "rejected": [dataclasses.asdict(item) for item in self.rejected],
            "source": self.source,
            "command": self.command,
            "config": self.config,
            "versions": self.versions,
            "created": self.created,
        }
        if self.precision is not None:
            record["precision"] = self.precision
        return {**record, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "manifest") -> "Manifest":
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"{origin} is not a {FORMAT_NAME} manifest (format={data.get('format')!r})")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{origin} has format_version {data['format_version']}; this code reads up to "
                             f"{FORMAT_VERSION}: update star")
        known = {"format", "format_version", "tokenizer", "image_size", "grid", "codebook_size", "token_dtype",
                 "views", "classes", "num_classes", "num_samples", "num_rejected", "shards", "rejected", "source",
                 "command", "config", "versions", "created", "precision"}
        try:
            views = data["views"]
            return cls(
                tokenizer=data["tokenizer"], image_size=int(data["image_size"]),
                grid=tuple(int(side) for side in data["grid"]), codebook_size=int(data["codebook_size"]),
                token_dtype=data.get("token_dtype") or str(token_dtype(int(data["codebook_size"]))),
                views=ViewsRecord(views["policy"], int(views["num_views"]), float(views["crop_range"]),
                                  int(views["seed"])),
                classes={str(name): int(index) for name, index in data["classes"].items()},
                shards=[ShardEntry(entry["file"], int(entry["samples"])) for entry in data["shards"]],
                rejected=[RejectedInput(item["path"], item["reason"]) for item in data.get("rejected", [])],
                source=data.get("source", {}), command=data.get("command", ""), config=data.get("config", {}),
                versions=data.get("versions", {}), created=data.get("created", ""), precision=data.get("precision"),
                format_version=int(data.get("format_version", FORMAT_VERSION)),
                extra={key: value for key, value in data.items() if key not in known},
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{origin} is damaged or incomplete ({error!r}); rerun tokenize into a new folder") from error

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {folder} a token-shard folder written by tokenize/run.py?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); rerun the same tokenize command to rewrite it") from error
        manifest = cls.from_dict(data, origin=str(path))
        manifest.folder = Path(folder)
        return manifest

    def write(self, folder: str | Path | None = None) -> Path:
        """Write `manifest.json` atomically into `folder` (default: where this manifest came from)."""
        from star.io import write_json_atomic

        folder = Path(folder) if folder is not None else self._folder()
        write_json_atomic(folder / MANIFEST_NAME, self.to_dict())
        self.folder = folder
        return folder / MANIFEST_NAME

    # -- the shard files --------------------------------------------------------------------------------
    def _folder(self, folder: str | Path | None = None) -> Path:
        if folder is not None:
            return Path(folder)
        if self.folder is None:
            raise ValueError("this manifest has no folder: pass one, or use Manifest.load(folder)")
        return self.folder

    def shard_paths(self, folder: str | Path | None = None) -> list[Path]:
        folder = self._folder(folder)
        return [folder / entry.file for entry in self.shards]

    def iter_samples(self, folder: str | Path | None = None) -> Iterator[ShardSample]:
        """Every sample of every shard, in manifest order (see the module-level `iter_samples`)."""
        return iter_samples(self.shard_paths(folder))

    def shard_problems(self, folder: str | Path | None = None) -> list[str]:
        """Cheap check of every shard file against the manifest, reading tar headers only (no payloads):
        present, every member's bytes inside the file (a truncated copy fails here), and the sample count."""
        folder = self._folder(folder)
        problems = []
        for entry in self.shards:
            tar_path = folder / entry.file
            if not tar_path.is_file():
                problems.append(f"{tar_path}: missing")
                continue
            try:
                count = _count_samples_from_headers(tar_path)
            except ValueError as error:
                problems.append(str(error))
                continue
            if count != entry.samples:
                problems.append(f"{tar_path}: holds {count} samples, the manifest says {entry.samples}")
        return problems

    def verify(self, folder: str | Path | None = None) -> None:
        """Raise ValueError naming each damaged or truncated shard (see `shard_problems`); before training."""
        problems = self.shard_problems(folder)
        if problems:
            folder = self._folder(folder)
            shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ValueError(f"{folder}: {len(problems)} damaged shard(s): {shown}. Run `python "
                             f"tokenize/inspect_shards.py {folder}` for details; delete a damaged shard and its "
                             ".json sidecar, then rerun the same tokenize command to rebuild it")


def _count_samples_from_headers(tar_path: Path) -> int:
    size = tar_path.stat().st_size
    keys, last = 0, None
    try:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar:
                if member.isfile() and member.offset_data + member.size > size:
                    raise ValueError(f"{tar_path}: truncated (member {member.name} ends past the end of the file); "
                                     f"{_rebuild_hint(tar_path)}")
                key, _ = split_member_name(member.name)
                if member.isfile() and key != last:
                    keys, last = keys + 1, key
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"{tar_path}: unreadable ({error}); {_rebuild_hint(tar_path)}") from error
    return keys
