"""Listing an ImageFolder tree: every regular file under each class folder, recursively, through symlinks that
stay inside the root, each real directory once. Nothing is dropped silently: what cannot be used (a file beside
the class folders, an unreadable directory, a dangling link, a loop, a link out of the root, a FIFO) is returned
as rejected, with a reason."""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class FolderItem:
    relative_path: str  # "class_name/sub/file.jpg"
    class_id: int
    size: int = 0  # bytes, for the input fingerprint


def hidden(name: str) -> bool:
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
            if hidden(entry.name):
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
