"""The token-shard format: the contract between stage one (tokenize) and stage two (train).

A dataset is a folder with `manifest.json` and WebDataset `.tar` shards. One sample per source image:
`__key__` (normalised relative path), `tokens.npy` (uint16 or int32 `[V, h, w]`), `cls` (class id as text) and
`json` (per view: crop box `[x0, y0, x1, y1]` in source pixels and the flip flag; plus the source size).
Each shard has a sidecar `shard-NNNNNN.json` (its sample count, keys and rejected inputs). The sidecar is
renamed into place after the tar, so "sidecar exists" means "shard complete": a rerun after a crash redoes only
shards without one.

This module owns the format of a shard: the one tar member grouper (`iter_tar_groups`, WebDataset's key rule),
a sample's members (`encode_sample_members`, `decode_sample`, checked against a `SampleSpec`) and the writer
(`ShardWriter`). The folder's `manifest.json` and the one way to read its samples are star/data/manifest.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from star.lock import pid_alive

FORMAT_NAME = "star-token-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
SHARD_PATTERN = re.compile(r"^shard-\d{6}\.(tar|json)$")


def names_a_shard_folder(names: Iterable[str]) -> bool:
    """Whether a folder holding entries with these names is a token-shard folder (a plan, a manifest or a shard)."""
    return any(name in (MANIFEST_NAME, PLAN_NAME) or SHARD_PATTERN.match(name) for name in names)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sidecar_path(tar_path: Path) -> Path:
    return tar_path.with_suffix(".json")


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def normalise_key(relative_path: str) -> str:
    """A WebDataset-safe key, one per path: WebDataset splits a member name at the first '.', so '.' is written
    %2E (and '%' itself %25, so two different paths never share a key: `x.y_z.png` and `x_y.z.png` stay apart)."""
    return relative_path.replace(os.sep, "/").replace("%", "%25").replace(".", "%2E")


# ----------------------------------------------------------------------------------------------------------
# The one tar member grouper (input tars and token shards alike)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = directory + base name up to its first '.', extension = the rest (lower-cased)."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


# A token shard's members are a few KB; an input tar's images may be large, but not this large.
MAX_SHARD_MEMBER_BYTES = 64 << 20
MAX_INPUT_MEMBER_BYTES = 1 << 30


class MemberTooLarge(ValueError):
    """A tar member larger than the reader accepts (a damaged or hostile header): refused before it is read."""


def iter_tar_groups(source: str | Path | BinaryIO, max_member_bytes: int = MAX_INPUT_MEMBER_BYTES
                    ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: payload}) for each run of consecutive members sharing a key, in tar order. `source`: a
    path, or a readable stream (a remote shard), read in one pass.

    Raises the tar's own errors (tarfile.TarError, EOFError, OSError), and MemberTooLarge for a member over
    `max_member_bytes` (never read into memory); callers say which file and what to do.
    """
    current_key, members = None, {}
    opened = tarfile.open(source, "r") if isinstance(source, (str, Path)) else tarfile.open(fileobj=source, mode="r|")
    with opened as tar:
        for member in tar:
            if not member.isfile():
                continue
            if member.size > max_member_bytes:
                raise MemberTooLarge(f"member {member.name} claims {member.size:,} bytes (more than "
                                     f"{max_member_bytes:,}): damaged or not this kind of tar")
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


@dataclass(frozen=True)
class SampleSpec:
    """What every sample of a shard folder must hold, from its manifest: checked as each sample is read (once per
    cache build, or in the stream loader's workers), never on the training step."""

    num_views: int
    grid: tuple[int, int]
    dtype: np.dtype
    codebook_size: int
    num_classes: int


MAX_TOKEN_ELEMENTS = 1 << 22  # 64 views of a 256 x 256 grid; a header claiming more is damaged


def _npy_header(payload: bytes) -> tuple[tuple[int, ...], np.dtype]:
    stream = io.BytesIO(payload)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(stream)
    return tuple(shape), np.dtype(dtype)


def _check_against(spec: SampleSpec, tokens: np.ndarray, class_id: int, views: list) -> None:
    h, w = spec.grid
    if tokens.shape != (spec.num_views, h, w) or tokens.dtype != spec.dtype:
        raise ValueError(f"tokens.npy is {tokens.dtype}{list(tokens.shape)}; the manifest says "
                         f"{spec.dtype}[{spec.num_views}, {h}, {w}]")
    if tokens.size and int(tokens.max()) >= spec.codebook_size:
        raise ValueError(f"token {int(tokens.max())} is outside the codebook of {spec.codebook_size}")
    if not 0 <= class_id < spec.num_classes:
        raise ValueError(f"class id {class_id} is outside the manifest's {spec.num_classes} classes "
                         f"(0..{spec.num_classes - 1}; {spec.num_classes} is the null class)")
    if len(views) != spec.num_views:
        raise ValueError(f"{len(views)} view records for {spec.num_views} views")


def decode_sample(members: dict, spec: SampleSpec | None = None) -> ShardSample:
    """One sample from its tar members; with `spec`, checked against the manifest (shape, dtype, token and class
    ranges, view records). Raises ValueError saying what is wrong; the npy header is read before its payload."""
    missing = [name for name in ("tokens.npy", "cls", "json") if name not in members]
    if missing:
        raise ValueError(f"no {', '.join(missing)} member")
    shape, dtype = _npy_header(members["tokens.npy"])
    if int(np.prod(shape)) > MAX_TOKEN_ELEMENTS or dtype.kind not in "iu":
        raise ValueError(f"tokens.npy header says {dtype}{list(shape)}: not a token grid")
    tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
    try:
        class_id = int(members["cls"].decode() if isinstance(members["cls"], bytes) else members["cls"])
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"cls member {members['cls'][:20]!r} is not an integer class id") from None
    meta = json.loads(members["json"])
    if not isinstance(meta, dict) or not isinstance(meta.get("views"), list):
        raise ValueError("json member has no list of views")
    if spec is not None:
        _check_against(spec, tokens, class_id, meta["views"])
    return ShardSample(
        key=members["__key__"],
        tokens=tokens,
        class_id=class_id,
        views=meta["views"],
        source_size=tuple(meta.get("source_size", (0, 0))),
        source=meta.get("source", ""),
    )


def _rebuild_hint(tar_path: Path) -> str:
    return (f"delete {tar_path.name} and its .json sidecar in {tar_path.parent}, then rerun the same tokenize "
            "command to rebuild only that shard")


def iter_shard(tar_path: str | Path | BinaryIO, name: str = "") -> Iterator[dict]:
    """The member dicts (`__key__`, `tokens.npy`, `cls`, `json`) of one shard (a path, or an opened stream called
    `name`), read without webdataset."""
    name = name or str(tar_path)
    try:
        for key, members in iter_tar_groups(tar_path, MAX_SHARD_MEMBER_BYTES):
            yield {"__key__": key, **members}
    except (tarfile.TarError, EOFError, OSError, MemberTooLarge) as error:
        raise ValueError(f"shard {name} is unreadable or truncated ({error}); {_rebuild_hint(Path(name))}") from error


def _decode_all(groups: Iterable[dict], name: str, spec: SampleSpec | None) -> Iterator[ShardSample]:
    for members in groups:
        try:
            yield decode_sample(members, spec)
        except (KeyError, ValueError) as error:
            raise ValueError(f"shard {name}: sample {members.get('__key__')!r} is malformed ({error}); "
                             f"{_rebuild_hint(Path(name))}") from error


# ----------------------------------------------------------------------------------------------------------
# Writing one shard. Temporary files carry the writer's pid and host in their names, so a later run (holding
# the folder lock) removes only temporaries of writers that are provably dead, never a live process's files.

TEMP_PATTERN = re.compile(r"^\.(?P<final>shard-\d{6}\.(?:tar|json))\.pid(?P<pid>\d+)@(?P<host>[^/]+)\.tmp$")


def temp_path_for(final_path: Path) -> Path:
    return final_path.parent / f".{final_path.name}.pid{os.getpid()}@{socket.gethostname()}.tmp"


def remove_dead_writers_temporaries(folder: Path) -> list[Path]:
    """Delete `.shard-*.tmp` files written by a tokenize process of this host that no longer runs.

    Files of live processes, of other hosts, and any name this module does not write are left alone."""
    removed, host = [], socket.gethostname()
    for path in folder.glob(".shard-*.tmp"):
        match = TEMP_PATTERN.match(path.name)
        if match and match["host"] == host and not pid_alive(int(match["pid"])):
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
        self._written: set[str] = set()
        self.class_ids: set[int] = set()
        self.rejected: list[dict] = []

    def write(self, sample: ShardSample) -> None:
        if sample.key in self._written:
            raise ValueError(f"two samples of {self.tar_path.name} have the key {sample.key!r}: a reader would merge "
                             "them into one")
        self._written.add(sample.key)
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
