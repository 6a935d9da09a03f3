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

import glob
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from star.data.listing import hidden, list_image_folder
from star.data.shards import MANIFEST_NAME, PLAN_NAME
from star.images import IMAGE_EXTENSIONS

# Members of an input tar tried as the image and as the class id, in this order.
TAR_IMAGE_MEMBERS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS) + ("img",)
TAR_CLASS_MEMBERS = ("cls", "cls.txt", "cls2", "label")


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
        return any(entry.is_dir() and not hidden(entry.name) for entry in os.scandir(root))
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
    if (root / MANIFEST_NAME).is_file() or (root / PLAN_NAME).is_file():
        raise ValueError(f"--data {data} is a token-shard folder (it holds {MANIFEST_NAME} or {PLAN_NAME}), not images: "
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
