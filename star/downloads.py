"""Official files by name or URL: `--vq-ckpt`, `--ckpt`, `--ref` and `--inception` accept an existing local path (used
as it is), the name of a file listed in OFFICIAL_FILES (e.g. `vq_ds16_c2i.pt`), or an `https://` / `http://` URL.
Names and URLs are downloaded once into the cache and used from there afterwards.

Cache: `--download-dir`, else `$STAR_CACHE`, else `$XDG_CACHE_HOME/star`, else `~/.cache/star`. A listed file lives
at `<cache>/<name>` (where the Inception finder also looks); any other URL at `<cache>/url-<hash of the URL>/<its
file name>`, so two URLs ending in the same name never share a file.

A download is plain HTTP (urllib): it streams into `<file>.part` with a tqdm bar, resumes a `.part` left by an
interrupted run with a Range request, and is renamed into place only when complete. A lock (star/lock.py) per file
makes a second process (another rank of a launch) wait for the first one's download instead of fetching it again.

Checksums: a file whose SHA-256 the project knows is refused when its sum differs. The hosts of these files
publish no sums the project could check against, so every entry's `sha256` is None; then the sum computed on the
first download (or the first use of a file put in the cache by hand) is recorded beside the file
(`<file>.sha256.json`, with its size and modification time) and a later use checks the file against it (the file
is hashed again only when its size or modification time changed).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from star.io import sha256_file, write_json_atomic
from star.lock import FolderLocked, folder_lock


class DownloadError(FileNotFoundError):
    """An official file or URL that could not be made available locally (offline, refused, or a wrong sum)."""


@dataclass(frozen=True)
class OfficialFile:
    name: str
    url: str
    what: str
    size: str | None = None  # as the host's file listing gives it; None: see the link
    sha256: str | None = None  # None: no published sum; the first download's is recorded and checked after


LLAMAGEN_HUB = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/"
ADM_REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                     "VIRTUAL_imagenet256_labeled.npz")
# The file clean-fid downloads (cleanfid/downloads_helper.py): NVIDIA's TorchScript FID Inception with its classifier.
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"

# Sizes of the LlamaGen files: the Hugging Face file listing of FoundationVision/LlamaGen.
OFFICIAL_FILES: dict[str, OfficialFile] = {entry.name: entry for entry in (
    OfficialFile("vq_ds16_c2i.pt", LLAMAGEN_HUB + "vq_ds16_c2i.pt", "LlamaGen VQ-16 tokenizer (--vq-config VQ-16)"),
    OfficialFile("vq_ds8_c2i.pt", LLAMAGEN_HUB + "vq_ds8_c2i.pt", "LlamaGen VQ-8 tokenizer (--vq-config VQ-8)",
                 "281 MB"),
    OfficialFile("c2i_B_256.pt", LLAMAGEN_HUB + "c2i_B_256.pt", "LlamaGen GPT-B, 256 px (--model GPT-B)", "444 MB"),
    OfficialFile("c2i_B_384.pt", LLAMAGEN_HUB + "c2i_B_384.pt", "LlamaGen GPT-B, 384 px", "444 MB"),
    OfficialFile("c2i_L_256.pt", LLAMAGEN_HUB + "c2i_L_256.pt", "LlamaGen GPT-L, 256 px (--model GPT-L)", "1.37 GB"),
    OfficialFile("c2i_L_384.pt", LLAMAGEN_HUB + "c2i_L_384.pt", "LlamaGen GPT-L, 384 px", "1.37 GB"),
    OfficialFile("c2i_XL_384.pt", LLAMAGEN_HUB + "c2i_XL_384.pt", "LlamaGen GPT-XL, 384 px", "3.1 GB"),
    OfficialFile("c2i_XXL_384.pt", LLAMAGEN_HUB + "c2i_XXL_384.pt", "LlamaGen GPT-XXL, 384 px", "5.64 GB"),
    OfficialFile("c2i_3B_384.pt", LLAMAGEN_HUB + "c2i_3B_384.pt", "LlamaGen GPT-3B, 384 px", "12.4 GB"),
    OfficialFile("VIRTUAL_imagenet256_labeled.npz", ADM_REFERENCE_URL,
                 "ADM's ImageNet 256 reference batch (--ref; its FID statistics)"),
    OfficialFile("inception-2015-12-05.pt", INCEPTION_URL,
                 "NVIDIA's FID Inception-v3 with its classifier (--inception; enables the Inception Score)"),
)}

URL_SCHEMES = ("https://", "http://")
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
LOCK_POLL_S = 2.0
RECORD_SUFFIX = ".sha256.json"
DOWNLOAD_DIR_HELP = ("folder that official file names and URLs given to the file flags are downloaded into (empty: "
                     "$STAR_CACHE, else $XDG_CACHE_HOME/star, else ~/.cache/star)")


def default_cache_dir() -> Path:
    """$STAR_CACHE, else $XDG_CACHE_HOME/star, else ~/.cache/star."""
    if os.environ.get("STAR_CACHE"):
        return Path(os.environ["STAR_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "star"
    return Path.home() / ".cache" / "star"


def is_url(value: str) -> bool:
    return value.lower().startswith(URL_SCHEMES)


@dataclass(frozen=True)
class Wanted:
    """One file to make available: where it comes from, where it goes, and the sum it must have (if known)."""

    url: str
    path: Path
    sha256: str | None


def wanted_file(value: str, cache_dir: str | os.PathLike | None = None) -> Wanted | None:
    """What `value` asks to download (None: it is neither a listed name nor a URL). A URL of a listed file is
    that file."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    listed = OFFICIAL_FILES.get(value) or next((e for e in OFFICIAL_FILES.values() if e.url == value), None)
    if listed is not None:
        return Wanted(listed.url, cache / listed.name, listed.sha256)
    if not is_url(value):
        return None
    name = Path(urllib.parse.urlparse(value).path).name or "download"
    return Wanted(value, cache / f"url-{hashlib.sha256(value.encode()).hexdigest()[:16]}" / name, None)


def fetch_file(value: str | None, flag: str, cache_dir: str | os.PathLike | None = None,
               progress: bool = True) -> str | None:
    """The local path to use for a flag's value. An existing path, an empty value, or anything that is neither a
    listed name nor a URL is returned unchanged (the caller's own checks report a missing file); a listed name or
    a URL is downloaded once into the cache (checked, see the module docstring) and its cached path returned."""
    if not value or Path(value).expanduser().exists():
        return value
    wanted = wanted_file(value, cache_dir)
    if wanted is None:
        return value
    with _download_lock(wanted.path):
        if not wanted.path.is_file():
            _download(wanted, flag, value, progress)
        _check_sum(wanted, flag, value)
    return str(wanted.path)


# ----------------------------------------------------------------------------------------------------------
# Sums


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + RECORD_SUFFIX)


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(_record_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _check_sum(wanted: Wanted, flag: str, value: str) -> None:
    """Refuse a cached file whose sum differs from the known one or from the one recorded when it came; record
    the sum of a file not yet recorded. Hashes the file only when its size or modification time is not the
    recorded one."""
    path, record = wanted.path, _read_record(wanted.path)
    stat = path.stat()
    unchanged = record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns
    actual = record.get("sha256") if unchanged else sha256_file(path)
    expected = wanted.sha256 or record.get("sha256")
    if expected and actual != expected:
        raise DownloadError(f"{flag} {value}: the cached {path} has sha256 {actual}, expected {expected}; delete it "
                            f"(and {_record_path(path).name}) to download {wanted.url} again")
    if not unchanged:
        write_json_atomic(_record_path(path), {"sha256": actual, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                               "url": wanted.url})


# ----------------------------------------------------------------------------------------------------------
# Downloading


@contextlib.contextmanager
def _download_lock(path: Path) -> Iterator[None]:
    """Hold the lock of one cached file; wait while another process holds it (a stale lock is taken over)."""
    folder = path.parent / ".locks" / path.name
    with contextlib.ExitStack() as held:
        waiting_said = False
        while True:
            try:
                held.enter_context(folder_lock(folder, f"download of {path.name}"))
                break
            except FolderLocked as error:
                if not waiting_said:
                    print(f"waiting for another process's download: {error}", file=sys.stderr)
                    waiting_said = True
                time.sleep(LOCK_POLL_S)
        yield


def _download(wanted: Wanted, flag: str, value: str, progress: bool) -> None:
    """Fetch wanted.url into wanted.path through `.part` (resumed when present); refuse a wrong sum."""
    part = wanted.path.with_name(wanted.path.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch_into(wanted.url, part, progress)
    except (urllib.error.URLError, OSError) as error:
        reason = error if isinstance(error, urllib.error.HTTPError) else getattr(error, "reason", None) or error
        kept = f" ({part.stat().st_size} bytes kept in {part.name}: run again to resume)" if part.is_file() else ""
        raise DownloadError(f"{flag} {value}: cannot download {wanted.url} ({reason}){kept}; fetch it by hand and "
                            f"put it at {wanted.path}") from None
    actual = sha256_file(part)
    if wanted.sha256 and actual != wanted.sha256:
        part.unlink()
        raise DownloadError(f"{flag} {value}: {wanted.url} gave a file with sha256 {actual}, expected "
                            f"{wanted.sha256}; it was deleted, not kept")
    os.replace(part, wanted.path)
    stat = wanted.path.stat()
    write_json_atomic(_record_path(wanted.path), {"sha256": actual, "size": stat.st_size,
                                                  "mtime_ns": stat.st_mtime_ns, "url": wanted.url})


def _range_total(content_range: str | None) -> int | None:
    """The full size in a Content-Range header ('bytes 0-9/100' or 'bytes */100'); None when not given."""
    total = (content_range or "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _open(url: str, have: int):
    """The response for `url` from byte `have` on (a Range request when have > 0)."""
    headers = {"User-Agent": "star-downloader"}
    if have:
        headers["Range"] = f"bytes={have}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def _fetch_into(url: str, part: Path, progress: bool) -> None:
    have = part.stat().st_size if part.is_file() else 0
    try:
        response = _open(url, have)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not have:
            raise
        if _range_total(error.headers.get("Content-Range")) == have:
            return  # the part is already the whole file
        part.unlink()  # longer than the file the server has now: start again
        have, response = 0, _open(url, 0)
    with response:
        resumed = have > 0 and response.status == 206
        if resumed and not (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
            raise OSError(f"the server answered the range from byte {have} with "
                          f"{response.headers.get('Content-Range')!r}")
        start = have if resumed else 0  # a server that ignores Range sends the whole file: start again
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        with open(part, "ab" if resumed else "wb") as handle, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
                     disable=not progress) as bar:
            while chunk := response.read(CHUNK_BYTES):
                handle.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")

