"""Stage one: images -> augmented views -> VQ token grids -> WebDataset shards with crop metadata.

Decoding and cropping run in DataLoader workers; all views of an image are encoded in one batch; each process
(under `accelerate launch` or `torchrun`) takes the shards whose index is its rank modulo the world size; rank 0
merges the manifest at the end. A rerun of the same command redoes only shards without a complete sidecar.
"""
from __future__ import annotations

import json
import platform
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from star.data.inputs import (
    InputPlan,
    class_member,
    image_member,
    iter_tar_groups,
    open_rgb_image,
    plan_inputs,
)
from star.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PLAN_NAME,
    ShardSample,
    ShardWriter,
    normalise_key,
    shard_is_complete,
    shard_name,
    sidecar_path,
    token_dtype,
)
from star.data.views import ViewPolicy, make_views
from star.io import sha256_file, write_json_atomic


@dataclass
class TokenizeConfig:
    data: str
    out: str
    vq_ckpt: str
    vq_config: str = "VQ-16"
    image_size: int = 256
    views: str = "tencrop"
    crop_range: float = 1.1
    seed: int = 0
    shard_size: int = 1000
    batch_size: int = 16  # images per encoder batch (each brings all its views)
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    progress: bool = True


# ----------------------------------------------------------------------------------------------------------
# Work items: one per input image, plus an end-of-shard marker after each shard's last image.


def _views_payload(image, key: str, config: TokenizeConfig, policy: ViewPolicy) -> dict:
    views = make_views(image, policy, config.image_size, config.crop_range, key, config.seed)
    return {
        "pixels": np.stack([view.pixels for view in views]),  # [V, S, S, 3] uint8
        "views": [{"box": [round(c, 3) for c in view.box], "flip": view.flip} for view in views],
        "source_size": image.size,
    }


class FolderViews(Dataset):
    def __init__(self, plan: InputPlan, shard_indices: list[int], config: TokenizeConfig):
        self.root, self.config, self.policy = plan.root, config, ViewPolicy.parse(config.views)
        self.items: list[tuple[int, Any]] = []  # (shard index, FolderItem or None = end of shard)
        for shard_index in shard_indices:
            self.items.extend((shard_index, item) for item in plan.units[shard_index])
            self.items.append((shard_index, None))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        shard_index, item = self.items[index]
        if item is None:
            return {"shard": shard_index, "end": True}
        record = {"shard": shard_index, "source": item.relative_path, "key": normalise_key(item.relative_path),
                  "class_id": item.class_id}
        try:
            image = open_rgb_image(self.root / item.relative_path)
            record.update(_views_payload(image, record["key"], self.config, self.policy))
        except ValueError as error:
            record["error"] = str(error)
        return record


class TarViews(IterableDataset):
    def __init__(self, plan: InputPlan, shard_indices: list[int], config: TokenizeConfig):
        self.tars, self.shard_indices = plan.units, shard_indices
        self.config, self.policy = config, ViewPolicy.parse(config.views)

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        mine = self.shard_indices if worker is None else self.shard_indices[worker.id :: worker.num_workers]
        for shard_index in mine:
            tar_path = self.tars[shard_index]
            try:
                for key, members in iter_tar_groups(tar_path):
                    source = f"{tar_path.name}:{key}"
                    record = {"shard": shard_index, "source": source, "key": normalise_key(f"{tar_path.stem}/{key}")}
                    try:
                        class_id = class_member(members)
                        payload = image_member(members)
                        if class_id is None or payload is None:
                            raise ValueError("sample has no image member or no `cls` member")
                        record["class_id"] = class_id
                        record.update(_views_payload(open_rgb_image(payload), record["key"], self.config, self.policy))
                    except ValueError as error:
                        record["error"] = str(error)
                    yield record
            except (tarfile.TarError, EOFError, OSError) as error:
                yield {"shard": shard_index, "source": str(tar_path), "key": "", "error": f"input tar unreadable: {error}"}
            yield {"shard": shard_index, "end": True}


def _collate(records: list[dict]) -> list[dict]:
    return records


# ----------------------------------------------------------------------------------------------------------


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _distributed_state(device: torch.device):
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")


def _plan_record(config: TokenizeConfig, plan: InputPlan, tokenizer: dict, grid: tuple[int, int], codebook_size: int) -> dict:
    return {
        "input_fingerprint": plan.fingerprint,
        "input_kind": plan.kind,
        "num_units": plan.num_units,
        "tokenizer_sha256": tokenizer["checkpoint_sha256"],
        "image_size": config.image_size,
        "grid": list(grid),
        "codebook_size": codebook_size,
        "views": config.views,
        "crop_range": config.crop_range,
        "seed": config.seed,
        "shard_size": config.shard_size,
    }


def check_output_folder(out: Path, expected: dict) -> None:
    """Refuse, before any work, an output folder made with another tokenizer, size, view policy or input set."""
    existing = None
    if (out / PLAN_NAME).is_file():
        existing = json.loads((out / PLAN_NAME).read_text())
    elif (out / MANIFEST_NAME).is_file() or any(out.glob("*.tar")):
        raise ValueError(f"--out {out} already holds shards not made by this tool's current format; use an empty folder")
    if existing is None:
        return
    differences = [f"{name}: folder has {existing.get(name)!r}, this run has {value!r}"
                   for name, value in expected.items() if existing.get(name) != value]
    if differences:
        raise ValueError(
            f"--out {out} holds shards made with different settings:\n  " + "\n  ".join(differences)
            + "\nUse a new --out folder (or delete this one) to tokenize with these settings."
        )


def _clean_temporaries(out: Path) -> None:
    for stale in out.glob(".shard-*.tmp"):
        stale.unlink(missing_ok=True)


def _load_tokenizer(config: TokenizeConfig, device: torch.device):
    from star.vq.model import VQConfig, load_vq

    vq_config = VQConfig.resolve(config.vq_config)
    model = load_vq(config.vq_ckpt, vq_config).to(device).eval()
    tokenizer = {
        "config": vq_config.to_dict(),
        "config_source": str(config.vq_config),
        "checkpoint": str(Path(config.vq_ckpt).resolve()),
        "checkpoint_sha256": sha256_file(config.vq_ckpt),
    }
    return model, vq_config, tokenizer


@torch.inference_mode()
def encode_views(model, pixels: np.ndarray, device: torch.device, use_bf16: bool) -> np.ndarray:
    """[N, S, S, 3] uint8 -> token grids [N, h, w] int64, LlamaGen's pixel convention (x / 127.5 - 1)."""
    images = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # [N, 3, S, S]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        indices = model.encode_indices(images)  # [N, h, w]
    return indices.cpu().numpy()


def run_tokenize(config: TokenizeConfig) -> dict:
    """Run stage one; returns the run summary (rank 0 also writes the merged manifest)."""
    started = time.time()
    out = Path(config.out)
    policy = ViewPolicy.parse(config.views)
    device = resolve_device(config.device)
    state = _distributed_state(device)
    if state.device.type == "cuda":
        device = state.device
    use_bf16 = device.type == "cuda" and config.precision in ("auto", "bf16")

    plan = plan_inputs(config.data, config.shard_size)
    model, vq_config, tokenizer = _load_tokenizer(config, device)
    downsample = vq_config.downsample
    if config.image_size % downsample:
        raise ValueError(f"--image-size {config.image_size} is not a multiple of the tokenizer's downsampling {downsample}")
    grid = (config.image_size // downsample, config.image_size // downsample)
    expected = _plan_record(config, plan, tokenizer, grid, vq_config.codebook_size)
    check_output_folder(out, expected)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _clean_temporaries(out)
        write_json_atomic(out / PLAN_NAME, expected)
    state.wait_for_everyone()

    mine = [i for i in range(plan.num_units) if i % state.num_processes == state.process_index]
    pending = [i for i in mine if not shard_is_complete(out / shard_name(i))]
    dataset = (FolderViews if plan.kind == "folder" else TarViews)(plan, pending, config)
    workers = config.workers if plan.kind == "folder" else min(config.workers, len(pending))
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=workers, collate_fn=_collate,
                        prefetch_factor=2 if workers > 0 else None, persistent_workers=False)
    dtype = token_dtype(vq_config.codebook_size)
    counts = {"images": 0, "views": 0, "rejected": 0, "shards_written": 0}
    writers: dict[int, ShardWriter] = {}
    total_images = sum(len(plan.units[i]) for i in pending) if plan.kind == "folder" else None
    bar = tqdm(total=total_images, unit="img", desc=f"tokenize[{state.process_index}]", dynamic_ncols=True,
               disable=not (config.progress and state.is_main_process))
    try:
        for batch in loader:
            good = [r for r in batch if not r.get("end") and "error" not in r]
            if good:
                pixels = np.concatenate([r["pixels"] for r in good])  # [sum V, S, S, 3]
                tokens = encode_views(model, pixels, device, use_bf16).astype(dtype)  # [sum V, h, w]
                offset = 0
            for record in batch:
                writer = writers.get(record["shard"])
                if writer is None:
                    writer = writers[record["shard"]] = ShardWriter(out / shard_name(record["shard"]),
                                                                          state.process_index)
                if record.get("end"):
                    writers.pop(record["shard"]).close()
                    counts["shards_written"] += 1
                    continue
                bar.update(1)
                if "error" in record:
                    writer.reject(record["source"], record["error"])
                    counts["rejected"] += 1
                    continue
                num_views = len(record["views"])
                writer.write(ShardSample(record["key"], tokens[offset : offset + num_views], record["class_id"],
                                         record["views"], tuple(record["source_size"]), record["source"]))
                offset += num_views
                counts["images"] += 1
                counts["views"] += num_views
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()

    state.wait_for_everyone()
    seconds = time.time() - started
    summary = {"process": state.process_index, "images_now": counts["images"], "rejected_now": counts["rejected"],
               "shards_now": counts["shards_written"], "seconds": round(seconds, 2),
               "images_per_second": round(counts["images"] / max(seconds, 1e-9), 2)}
    if state.is_main_process:
        manifest = merge_manifest(out, plan, config, tokenizer, grid, vq_config.codebook_size, policy)
        summary.update({
            "images": manifest["num_samples"], "rejected": manifest["num_rejected"],
            "views": manifest["num_samples"] * policy.num_views, "shards": len(manifest["shards"]),
            "out": str(out),
        })
    return summary


def merge_manifest(out: Path, plan: InputPlan, config: TokenizeConfig, tokenizer: dict, grid, codebook_size: int,
                   policy: ViewPolicy) -> dict:
    shards, rejected, class_ids = [], [], set()
    for index in range(plan.num_units):
        tar_path = out / shard_name(index)
        if not shard_is_complete(tar_path):
            raise RuntimeError(f"shard {tar_path} is missing after all processes finished; rerun the same command")
        sidecar = json.loads(sidecar_path(tar_path).read_text())
        shards.append({"file": tar_path.name, "samples": sidecar["samples"]})
        rejected.extend(sidecar["rejected"])
        class_ids.update(sidecar["class_ids"])
    classes = plan.classes
    if plan.kind == "tars":  # tars carry ids only: name each class by its id, 0..max
        classes = {str(i): i for i in range(max(class_ids, default=-1) + 1)}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer,
        "image_size": config.image_size,
        "grid": list(grid),
        "codebook_size": codebook_size,
        "token_dtype": str(token_dtype(codebook_size)),
        "views": {"policy": str(policy), "num_views": policy.num_views, "crop_range": config.crop_range,
                  "seed": config.seed},
        "classes": classes,
        "num_classes": len(classes),
        "num_samples": sum(s["samples"] for s in shards),
        "num_rejected": len(rejected),
        "shards": shards,
        "rejected": rejected,
        "source": {"kind": plan.kind, "data": str(Path(config.data).resolve()), "fingerprint": plan.fingerprint},
        "command": " ".join(sys.argv),
        "config": asdict(config),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def format_summary(summary: dict) -> str:
    lines = ["", "tokenize summary", "----------------"]
    for name in ("images", "views", "rejected", "shards", "images_now", "shards_now", "seconds",
                 "images_per_second", "out"):
        if name in summary:
            lines.append(f"{name:>18}: {summary[name]}")
    return "\n".join(lines)
