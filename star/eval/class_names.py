"""Names for class ids, so pictures say "coffee" instead of "1": from a shard folder's manifest (whose `classes`
maps name -> id), a comma list, or the shards a run was trained on (its config.json, checked against the data
digest the run recorded)."""
from __future__ import annotations

import json
from pathlib import Path

from star.data.manifest import MANIFEST_NAME, Manifest

MAX_NAME_CHARS = 32  # longer names (ImageNet's synonym lists) are cut to keep the grid's label strip narrow


def names_from_manifest(manifest: Manifest) -> dict[int, str]:
    return {index: name for name, index in manifest.classes.items()}


def parse_class_names(text: str, num_classes: int, flag: str = "--class-names") -> tuple[dict[int, str], str]:
    """(id -> name, where from) for a flag value: a shard folder (or its manifest.json), or names in id order
    separated by commas ("T-shirt/top,Trouser,..."; one name: "name,")."""
    path = Path(text)
    if path.exists():
        manifest = Manifest.load(path.parent if path.name == MANIFEST_NAME and path.is_file() else path)
        names, source = names_from_manifest(manifest), f"manifest of {text}"
    elif "," in text:
        names, source = {i: name.strip() for i, name in enumerate(text.split(",")) if name.strip()}, flag
    else:
        raise ValueError(f"{flag} {text!r}: no such shard folder; give a shard folder (its manifest names the "
                         "classes) or names in class-id order separated by commas")
    too_big = sorted(index for index in names if index >= num_classes)
    if too_big:
        raise ValueError(f"{flag} {text}: names class ids up to {too_big[-1]}, but the model has {num_classes} "
                         f"classes (0..{num_classes - 1}); give the names of the shards this model was trained on")
    return names, source


def run_class_names(checkpoint_file: Path) -> tuple[dict[int, str], str]:
    """The class names of the shards a run was trained on: the run's config.json names the shard folder and the
    digest of its manifest; the names are used only when that folder still holds the same data."""
    run_config = Path(checkpoint_file).parent.parent.parent / "config.json"
    if not run_config.is_file():
        return {}, "none found (not a training run's checkpoint)"
    try:
        recorded = json.loads(run_config.read_text())
        shards, digest = recorded["settings"]["shards"], recorded["data_digest"]
        manifest = Manifest.load(shards)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return {}, f"none found (the run's shards could not be read: {error})"
    if manifest.digest != digest:
        return {}, f"none found ({shards} no longer holds the data the run was trained on)"
    return names_from_manifest(manifest), f"manifest of {shards} (the run's training shards)"


def row_label(index: int, names: dict[int, str]) -> str:
    """'3: coffee', or 'class 3' without a name."""
    name = names.get(index)
    if not name:
        return f"class {index}"
    if len(name) > MAX_NAME_CHARS:
        name = name[: MAX_NAME_CHARS - 3] + "..."
    return f"{index}: {name}"
