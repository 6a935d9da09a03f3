"""Stage-one inputs: an ImageFolder tree (`class/**/*.jpg|png|...`) or WebDataset tars of images with `cls`.

Inputs are listed in a fixed order and cut into work units, one output shard each: chunks of `shard_size`
images for a folder, one input tar for tars. The order is a pure function of the input, so every process of a
run, and every rerun after a crash, agrees on which image goes to which shard.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class FolderItem:
    relative_path: str  # "class_name/sub/file.jpg"
    class_id: int


@dataclass
class InputPlan:
    kind: str  # "folder" | "tars"
    root: Path
    classes: dict[str, int]  # class name -> id (sorted folder names; for tars, str(id))
    units: list  # folder: list[list[FolderItem]]; tars: list[Path]
    fingerprint: str  # changes whenever the set of inputs changes

    @property
    def num_units(self) -> int:
        return len(self.units)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def list_image_folder(root: Path) -> tuple[dict[str, int], list[FolderItem]]:
    """Every non-hidden file under each class folder (recursively): non-images are rejected later, with a reason."""
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not _hidden(entry.name))
    classes = {name: index for index, name in enumerate(class_names)}
    items = []
    for name in class_names:
        for directory, subdirs, files in os.walk(root / name):
            subdirs[:] = sorted(d for d in subdirs if not _hidden(d))
            for file_name in sorted(files):
                if not _hidden(file_name):
                    relative = os.path.relpath(os.path.join(directory, file_name), root).replace(os.sep, "/")
                    items.append(FolderItem(relative, classes[name]))
    return classes, items


def find_input_tars(data: str) -> list[Path]:
    path = Path(data)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    if path.is_file() and path.suffix == ".tar":
        return [path]
    return sorted(Path(p) for p in glob.glob(data) if p.endswith(".tar"))


def plan_inputs(data: str, shard_size: int) -> InputPlan:
    root = Path(data)
    tars = find_input_tars(data)
    has_class_dirs = root.is_dir() and any(entry.is_dir() and not _hidden(entry.name) for entry in os.scandir(root))
    if has_class_dirs:
        classes, items = list_image_folder(root)
        if not items:
            raise ValueError(f"--data {data}: the class folders hold no files. Expected {data}/<class>/<image>.jpg")
        units = [items[start : start + shard_size] for start in range(0, len(items), shard_size)]
        digest = hashlib.sha256()
        for item in items:
            stat = (root / item.relative_path).stat()
            digest.update(f"{item.relative_path}\0{item.class_id}\0{stat.st_size}\n".encode())
        return InputPlan("folder", root, classes, units, digest.hexdigest())
    if tars:
        digest = hashlib.sha256()
        for tar in tars:
            digest.update(f"{tar.name}\0{tar.stat().st_size}\n".encode())
        return InputPlan("tars", root if root.is_dir() else root.parent, {}, tars, digest.hexdigest())
    raise ValueError(
        f"--data {data}: no input found. Give an ImageFolder tree ({data}/<class>/<image>.jpg) "
        "or WebDataset tars of images with a `cls` member (a folder of .tar files, one .tar, or a glob)."
    )


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


def iter_tar_groups(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a WebDataset tar's members by key (the name up to the first '.' of the base name)."""
    current_key, members = None, {}
    with tarfile.open(tar_path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            stem, _, extension = base.partition(".")
            key = f"{directory}/{stem}" if directory else stem
            if key != current_key:
                if members:
                    yield current_key, members
                current_key, members = key, {}
            members[extension.lower()] = tar.extractfile(member).read()
    if members:
        yield current_key, members


def image_member(members: dict[str, bytes]) -> bytes | None:
    for extension in ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif", "img"):
        if extension in members:
            return members[extension]
    return None


def class_member(members: dict[str, bytes]) -> int | None:
    for extension in ("cls", "cls.txt", "cls2", "label"):
        if extension in members:
            return int(members[extension].decode().strip())
    return None
