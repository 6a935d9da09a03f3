"""`manifest.json`, typed: what a token-shard folder holds (tokenizer, grid, views, classes, shards and their
counts and sizes), checked when it is loaded, and the one way to read the folder's samples against it.

The manifest is data, never a command: every shard entry must be a plain file name inside the folder, and
remote folders are opened only under the location the user typed (star/data/location.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from star.data.location import ShardLocation, check_plain_name
from star.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SampleSpec,
    ShardSample,
    _decode_all,
    _rebuild_hint,
    iter_shard,
    split_member_name,
    token_dtype,
)
from star.data.views import ViewPolicy


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


def shard_tokens(shards: str | Path, view: int = 0, limit: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token grids of one view per sample ([N, T] int64) and the class ids ([N]) from a shard folder: all of them
    in shard order, or with `limit` a class-balanced random subset (limit // classes of each, drawn by a
    generator seeded with `seed`, kept in shard order), read in one pass holding only the subset."""
    manifest = Manifest.load(shards)
    if view >= manifest.num_views:
        raise ValueError(f"view {view} requested, {shards} stores {manifest.num_views} views")
    if limit and limit < manifest.num_classes:
        raise ValueError(f"--limit {limit} is fewer than the {manifest.num_classes} classes of {shards}: a "
                         "class-balanced subset needs at least one image of each")
    if not limit or limit >= manifest.num_samples:
        samples = [(s.tokens[view].reshape(-1).astype(np.int64), s.class_id) for s in manifest.iter_samples()]
    else:
        samples = _balanced_subset(manifest.iter_samples(), view, max(1, limit // manifest.num_classes), seed)
    if not samples:
        raise ValueError(f"{shards} holds no samples")
    tokens, labels = zip(*samples)
    return np.stack(tokens), np.array(labels)


def _balanced_subset(samples, view: int, per_class: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """`per_class` samples of each class, uniformly at random (a seeded random key per sample; the smallest
    keys of each class are kept), in their original order."""
    rng = np.random.default_rng(seed)
    kept: dict[int, list] = {}
    for index, sample in enumerate(samples):
        heap = kept.setdefault(sample.class_id, [])
        entry = (-rng.random(), index, sample.tokens[view].reshape(-1).astype(np.int64), sample.class_id)
        if len(heap) < per_class:
            heapq.heappush(heap, entry)
        elif entry[0] > heap[0][0]:
            heapq.heapreplace(heap, entry)
    chosen = sorted((entry for heap in kept.values() for entry in heap), key=lambda entry: entry[1])
    return [(tokens, label) for _, _, tokens, label in chosen]
