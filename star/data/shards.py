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
import hashlib
import io
import json
import os
import re
import socket
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from star.data.location import ShardLocation, check_plain_name
from star.data.views import ViewPolicy
from star.lock import pid_alive

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


def iter_samples(tar_paths: Iterable[str | Path], spec: SampleSpec | None = None) -> Iterator[ShardSample]:
    """Every sample of the given shards, in order, checked against `spec`: the one shard-reading loop (the map
    cache, the probe, NLL and `inspect_shards` all read through it). A damaged shard raises ValueError naming it."""
    for tar_path in tar_paths:
        yield from _decode_all(iter_shard(tar_path), str(tar_path), spec)


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


# ----------------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class ShardEntry:
    file: str  # "shard-000000.tar", a plain name inside the shard folder
    samples: int
    bytes: int | None = None  # the tar's size (verification without reading it); None in older manifests


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
    location: ShardLocation | None = field(default=None, compare=False)  # where it was loaded from or written to

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

    @property
    def folder(self) -> Path | None:
        """The local folder it came from (None: not loaded, or remote)."""
        return None if self.location is None or self.location.is_remote else self.location.folder

    @property
    def sample_spec(self) -> SampleSpec:
        return SampleSpec(self.num_views, tuple(self.grid), self.dtype, self.codebook_size, self.num_classes)

    @property
    def digest(self) -> str:
        """sha256 of everything that decides the tokens and their order (the manifest minus when and how it was
        written): the token cache's key, and what a run records to know its data again."""
        record = {k: v for k, v in self.to_dict().items() if k not in ("created", "command", "versions")}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

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
            "shards": [{k: v for k, v in dataclasses.asdict(entry).items() if v is not None} for entry in self.shards],
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
        if not isinstance(data, dict):
            raise ValueError(f"{origin} holds a JSON {type(data).__name__}, not a manifest object; rerun tokenize "
                             "into a new folder")
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
            manifest = cls(
                tokenizer=data["tokenizer"], image_size=int(data["image_size"]),
                grid=tuple(int(side) for side in data["grid"]), codebook_size=int(data["codebook_size"]),
                token_dtype=data.get("token_dtype") or str(token_dtype(int(data["codebook_size"]))),
                views=ViewsRecord(views["policy"], int(views["num_views"]), float(views["crop_range"]),
                                  int(views["seed"])),
                classes={str(name): int(index) for name, index in data["classes"].items()},
                shards=[ShardEntry(entry["file"], int(entry["samples"]),
                                   None if entry.get("bytes") is None else int(entry["bytes"]))
                        for entry in data["shards"]],
                rejected=[RejectedInput(item["path"], item["reason"]) for item in data.get("rejected", [])],
                source=data.get("source", {}), command=data.get("command", ""), config=data.get("config", {}),
                versions=data.get("versions", {}), created=data.get("created", ""), precision=data.get("precision"),
                format_version=int(data.get("format_version", FORMAT_VERSION)),
                extra={key: value for key, value in data.items() if key not in known},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{origin} is damaged or incomplete ({error!r}); rerun tokenize into a new folder") from error
        problems = manifest.problems()
        if problems:
            raise ValueError(f"{origin} is inconsistent: {'; '.join(problems)}. Rerun tokenize into a new folder")
        return manifest

    def problems(self) -> list[str]:
        """What makes this manifest unusable (empty when it is sound): names, counts, dtype, views, classes."""
        problems = []
        for entry in self.shards:
            try:
                check_plain_name(entry.file, "shard entry")
            except ValueError as error:
                problems.append(str(error))
            if entry.samples < 0 or (entry.bytes is not None and entry.bytes < 0):
                problems.append(f"shard {entry.file}: negative count")
        names = [entry.file for entry in self.shards]
        if len(set(names)) != len(names):
            problems.append(f"a shard is listed twice ({sorted({n for n in names if names.count(n) > 1})})")
        if not self.shards:
            problems.append("no shards")
        if self.image_size <= 0 or len(self.grid) != 2 or min(self.grid) <= 0 or self.codebook_size <= 0:
            problems.append(f"image size {self.image_size}, grid {list(self.grid)}, codebook {self.codebook_size}: "
                            "each must be positive")
        if self.token_dtype not in ("uint16", "int32") or np.dtype(self.token_dtype) != token_dtype(self.codebook_size):
            problems.append(f"token_dtype {self.token_dtype!r} does not fit codebook size {self.codebook_size} "
                            f"(expected {token_dtype(self.codebook_size)})")
        problems += self._view_problems() + self._class_problems()
        return problems

    def _view_problems(self) -> list[str]:
        try:
            expected = ViewPolicy.parse(self.views.policy).num_views
        except ValueError as error:
            return [str(error)]
        if self.views.num_views != expected:
            return [f"num_views {self.views.num_views} but view policy {self.views.policy} makes {expected}"]
        return []

    def _class_problems(self) -> list[str]:
        ids = list(self.classes.values())
        if not ids:
            return ["no classes"]
        if sorted(ids) != list(range(len(ids))):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            return [f"class ids must be 0..{len(ids) - 1}, each once" + (f" (repeated: {repeated[:5]})" if repeated
                                                                          else "")]
        return []

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        """The manifest of a local shard folder or of a remote location (see star/data/location.py)."""
        location = ShardLocation(str(folder))
        where = location.url(MANIFEST_NAME)
        if not location.is_remote and not Path(where).is_file():
            hint = " (it is a file)" if Path(folder).is_file() else ""
            raise FileNotFoundError(f"{where} not found: is {folder}{hint} a token-shard folder written by "
                                    "tokenize/run.py?")
        try:
            data = json.loads(location.read_bytes(MANIFEST_NAME))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{where} is not valid JSON ({error}); rerun the same tokenize command to rewrite "
                             "it") from error
        except OSError as error:
            raise FileNotFoundError(f"{where}: cannot read it ({error})") from error
        manifest = cls.from_dict(data, origin=where)
        manifest.location = location
        return manifest

    def write(self, folder: str | Path | None = None) -> Path:
        """Write `manifest.json` atomically into `folder` (default: where this manifest came from)."""
        from star.io import write_json_atomic

        folder = Path(folder) if folder is not None else self._folder()
        write_json_atomic(folder / MANIFEST_NAME, self.to_dict())
        self.location = ShardLocation(str(folder))
        return folder / MANIFEST_NAME

    # -- the shard files --------------------------------------------------------------------------------
    def _folder(self, folder: str | Path | None = None) -> Path:
        if folder is not None:
            return Path(folder)
        if self.location is None:
            raise ValueError("this manifest has no folder: pass one, or use Manifest.load(folder)")
        return self.location.folder

    def _location(self) -> ShardLocation:
        if self.location is None:
            raise ValueError("this manifest has no location: use Manifest.load(folder)")
        return self.location

    def shard_paths(self, folder: str | Path | None = None) -> list[Path]:
        """Local shard files (each manifest entry checked to be a plain name inside the folder)."""
        folder = self._folder(folder)
        return [folder / check_plain_name(entry.file, "shard entry") for entry in self.shards]

    def shard_urls(self) -> list[str]:
        """What WebDataset opens for each shard: local paths, or URLs under the remote root the user gave."""
        return [self._location().url(entry.file) for entry in self.shards]

    def iter_samples(self, entries: Iterable[ShardEntry] | None = None) -> Iterator[ShardSample]:
        """Every sample of every shard (or of `entries`), in manifest order, checked against the manifest
        (`sample_spec`); local or remote. A damaged shard, or one whose count differs from the manifest's, raises
        ValueError naming it."""
        location, spec = self._location(), self.sample_spec
        for entry in self.shards if entries is None else entries:
            with location.open(entry.file) as stream:
                count = 0
                for sample in _decode_all(iter_shard(stream, location.url(entry.file)), location.url(entry.file), spec):
                    count += 1
                    yield sample
            if count != entry.samples:
                raise ValueError(f"shard {location.url(entry.file)} holds {count} samples, the manifest says "
                                 f"{entry.samples}; {_rebuild_hint(Path(entry.file))}")

    def shard_problems(self, folder: str | Path | None = None, full: bool = False) -> list[str]:
        """Check every shard file against the manifest without reading payloads: present and of the recorded size
        (a stat); with `full` (or a manifest that records no sizes) the tar headers too: every member's bytes
        inside the file, and the sample count. Local folders only."""
        folder = self._folder(folder)
        problems = []
        for entry in self.shards:
            tar_path = folder / check_plain_name(entry.file, "shard entry")
            if not tar_path.is_file():
                problems.append(f"{tar_path}: missing")
                continue
            if entry.bytes is not None and tar_path.stat().st_size != entry.bytes:
                problems.append(f"{tar_path}: {tar_path.stat().st_size:,} bytes, the manifest says {entry.bytes:,}")
                continue
            if not full and entry.bytes is not None:
                continue
            try:
                count = _count_samples_from_headers(tar_path)
            except ValueError as error:
                problems.append(str(error))
                continue
            if count != entry.samples:
                problems.append(f"{tar_path}: holds {count} samples, the manifest says {entry.samples}")
        return problems

    def verify(self, folder: str | Path | None = None, full: bool = False) -> None:
        """Raise ValueError naming each damaged or truncated shard (see `shard_problems`); before training."""
        problems = self.shard_problems(folder, full)
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
