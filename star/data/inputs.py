"""Stage-one inputs: an ImageFolder tree (`class/**/*.jpg|png|...`) or WebDataset tars of images with `cls`.

Inputs are listed in a fixed order and cut into work units, one output shard each: chunks of `shard_size`
images for a folder, one input tar for tars. A folder's images are dealt to shards by a seeded permutation
(`shard_order="shuffled"`), so each shard holds a spread of classes instead of one or two: the stream loader,
which reads a few shards at a time, then sees batches close to a global shuffle. The order is a pure function
of the input and the seed, so every process of a run, and every rerun after a crash, agrees on which image goes
to which shard.

Nothing is dropped silently: what the listing cannot use (a file at the top level beside the class folders, an
unreadable directory, a dangling symlink, a symlink loop, a folder reached a second time through a symlink) is
kept in `InputPlan.rejected` with a reason, and ends in the manifest's rejected inputs.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from star.images import IMAGE_EXTENSIONS

# Members of an input tar tried as the image and as the class id, in this order.
TAR_IMAGE_MEMBERS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS) + ("img",)
TAR_CLASS_MEMBERS = ("cls", "cls.txt", "cls2", "label")


@dataclass(frozen=True)
class FolderItem:
    relative_path: str  # "class_name/sub/file.jpg"
    class_id: int
    size: int = 0  # bytes, for the input fingerprint


@dataclass
class InputPlan:
    kind: str  # "folder" | "tars"
    root: Path
    classes: dict[str, int]  # class name -> id (sorted folder names; for tars, str(id))
    units: list  # folder: list[list[FolderItem]]; tars: list[Path]
    fingerprint: str  # changes whenever the set of inputs changes
    rejected: list[dict] = field(default_factory=list)  # [{"path", "reason"}] found while listing

    @property
    def num_units(self) -> int:
        return len(self.units)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _link_problem(path: str) -> str | None:
    """Why `path` (a symlink, or a name whose stat failed) cannot be read, or None if it can."""
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink loop"
        if os.path.islink(path):
            return f"dangling symlink (points to {os.readlink(path)}, which does not exist)"
        return f"cannot stat: {error.strerror}"
    return None


class _FolderLister:
    """Walks the class folders once, following symlinks, visiting each real directory at most once. A symlink
    that leads outside the root is rejected unless `follow_links` (a dataset is what lies under --data)."""

    def __init__(self, root: Path, follow_links: bool = False):
        self.root = root
        self.real_root = os.path.realpath(root)
        self.follow_links = follow_links
        self.items: list[FolderItem] = []
        self.rejected: list[dict] = []
        self._seen: dict[tuple[int, int], str] = {}  # (device, inode) of a visited directory -> its relative path

    def reject(self, path: str, reason: str) -> None:
        self.rejected.append({"path": self._relative(path), "reason": reason})

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def scan(self, path: str) -> list[os.DirEntry] | None:
        try:
            with os.scandir(path) as entries:
                return sorted(entries, key=lambda entry: entry.name)
        except OSError as error:
            self.reject(path, f"unreadable directory: {error.strerror or error}")
            return None

    def first_visit(self, path: str) -> bool:
        """True the first time a real directory is reached; a second path to it is rejected, naming the first."""
        info = os.stat(path)
        identity = (info.st_dev, info.st_ino)
        if identity in self._seen:
            first = self._seen[identity]
            inside = self._relative(path).startswith(first + "/") or first == "."
            self.reject(path, f"symlink loop (leads back to {first}/)" if inside
                        else f"same directory as {first}/ (reached through a symlink): counted once, there")
            return False
        self._seen[identity] = self._relative(path)
        return True

    def entries(self, directory: str) -> Iterator[tuple[os.DirEntry, bool]]:
        """(entry, is_directory) for the usable entries of `directory`, sorted: hidden names skipped, broken links
        rejected, a directory only on its first visit."""
        for entry in self.scan(directory) or ():
            if _hidden(entry.name):
                continue
            problem = self._link_problem(entry.path) if entry.is_symlink() else None
            if problem:
                self.reject(entry.path, problem)
            elif entry.is_dir():
                if self.first_visit(entry.path):
                    yield entry, True
            elif not stat.S_ISREG(os.stat(entry.path).st_mode):
                self.reject(entry.path, "not a regular file (a FIFO, socket or device): never opened")
            else:
                yield entry, False

    def _link_problem(self, path: str) -> str | None:
        problem = _link_problem(path)
        target = os.path.realpath(path)
        if problem is None and not self.follow_links and os.path.commonpath([self.real_root, target]) != self.real_root:
            return f"symlink to {target}, outside --data: not followed (pass --follow-links to read it)"
        return problem

    def walk_class(self, directory: str, class_id: int) -> None:
        for entry, is_directory in self.entries(directory):
            if is_directory:
                self.walk_class(entry.path, class_id)
            else:
                self.items.append(FolderItem(self._relative(entry.path), class_id, entry.stat().st_size))

    def class_folders(self) -> list[os.DirEntry]:
        """The root's class folders; everything else at the top level is rejected with a reason."""
        self.first_visit(str(self.root))
        folders = []
        for entry, is_directory in self.entries(str(self.root)):
            if is_directory:
                folders.append(entry)
            else:
                self.reject(entry.path, "file at the top level beside the class folders: it has no class; "
                                        "move it into a class folder")
        return folders


def list_image_folder(root: Path, follow_links: bool = False) -> tuple[dict[str, int], list[FolderItem], list[dict]]:
    """(classes, items, rejected): every non-hidden regular file under each class folder, recursively and through
    symlinks that stay inside `root` (any symlink with `follow_links`); non-images are rejected later by the
    decoder, with a reason."""
    lister = _FolderLister(Path(root), follow_links)
    folders = lister.class_folders()
    classes = {entry.name: index for index, entry in enumerate(folders)}
    for entry in folders:
        lister.walk_class(entry.path, classes[entry.name])
    return classes, lister.items, lister.rejected


def find_input_tars(data: str) -> list[Path]:
    path = Path(data)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    if path.is_file() and path.suffix == ".tar":
        return [path]
    return sorted(Path(p) for p in glob.glob(data) if p.endswith(".tar"))


def _has_class_dirs(root: Path) -> bool:
    if not root.is_dir():
        return False
    try:
        return any(entry.is_dir() and not _hidden(entry.name) for entry in os.scandir(root))
    except OSError as error:
        raise ValueError(f"--data {root}: cannot read it ({error.strerror or error})") from error


SHARD_ORDERS = ("shuffled", "listing")  # images dealt to shards by a seeded permutation, or in listing order


def shard_order(count: int, order: str, seed: int) -> list[int]:
    """The listing indices in the order they are dealt to shards."""
    if order == "listing":
        return list(range(count))
    return np.random.default_rng([seed, count]).permutation(count).tolist()


def _folder_plan(data: str, root: Path, shard_size: int, order: str, seed: int, follow_links: bool) -> InputPlan:
    classes, listed, rejected = list_image_folder(root, follow_links)
    if not listed:
        raise ValueError(f"--data {data}: the class folders hold no files. Expected {data}/<class>/<image>.jpg")
    items = [listed[index] for index in shard_order(len(listed), order, seed)]
    units = [items[start : start + shard_size] for start in range(0, len(items), shard_size)]
    digest = hashlib.sha256()
    for item in listed:
        digest.update(f"{item.relative_path}\0{item.class_id}\0{item.size}\n".encode())
    for problem in rejected:  # a clean input's fingerprint depends on its files alone
        digest.update(f"rejected\0{problem['path']}\0{problem['reason']}\n".encode())
    return InputPlan("folder", root, classes, units, digest.hexdigest(), rejected)


def plan_inputs(data: str, shard_size: int, order: str = "shuffled", seed: int = 0,
                follow_links: bool = False) -> InputPlan:
    """The work units of `data`. Folder images go to shards in `order` (see SHARD_ORDERS); input tars are
    streamed, so each becomes one shard in its own order (shuffle the tars when writing them)."""
    root = Path(data)
    _refuse_token_shards(root, data)
    if _has_class_dirs(root):
        return _folder_plan(data, root, shard_size, order, seed, follow_links)
    tars = find_input_tars(data)
    if tars:
        digest = hashlib.sha256()
        for tar in tars:
            digest.update(f"{tar.name}\0{tar.stat().st_size}\n".encode())
        return InputPlan("tars", root if root.is_dir() else root.parent, {}, tars, digest.hexdigest())
    loose = root.is_dir() and any(path.suffix.lower() in IMAGE_EXTENSIONS for path in root.iterdir())
    hint = " It holds images but no class folders: move them into <class>/ folders." if loose else ""
    raise ValueError(
        f"--data {data}: no input found. Give an ImageFolder tree ({data}/<class>/<image>.jpg) "
        f"or WebDataset tars of images with a `cls` member (a folder of .tar files, one .tar, or a glob).{hint}"
    )


def _refuse_token_shards(root: Path, data: str) -> None:
    """A token-shard folder given as --data would be listed as a class called `cache` and 0 images."""
    if (root / "manifest.json").is_file() or (root / "plan.json").is_file():
        raise ValueError(f"--data {data} is a token-shard folder (it holds manifest.json or plan.json), not images: "
                         "give the image folder (class/*.jpg) or WebDataset tars of images")


def open_rgb_image(payload: bytes | str | Path) -> Image.Image:
    """Decode fully (so truncated files fail here, not later); raises ValueError with a reason on bad input."""
    try:
        image = Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload)
        image.load()
    except Image.DecompressionBombError as error:
        raise ValueError(f"image too large: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"not a readable image: {error}") from error
    if image.width < 1 or image.height < 1:
        raise ValueError("empty image")
    return image


def image_member(members: dict[str, bytes]) -> bytes | None:
    for extension in TAR_IMAGE_MEMBERS:
        if extension in members:
            return members[extension]
    return None


MAX_CLASS_ID = 1_000_000  # ImageNet-21k has 21,841 classes; an id past this is damage, and would size a table


def class_member(members: dict[str, bytes]) -> int | None:
    for extension in TAR_CLASS_MEMBERS:
        if extension in members:
            try:
                class_id = int(members[extension].decode().strip())
            except (UnicodeDecodeError, ValueError) as error:
                raise ValueError(f"`{extension}` member is not an integer class id: {error}") from error
            if not 0 <= class_id <= MAX_CLASS_ID:
                raise ValueError(f"`{extension}` class id {class_id} is outside 0..{MAX_CLASS_ID}")
            return class_id
    return None
