"""Stage one: images -> augmented views -> VQ token grids -> WebDataset shards with crop metadata.

Decoding and cropping run in DataLoader workers; all views of an image are encoded in one batch; each process
(under `accelerate launch` or `torchrun`) takes the shards whose index is its rank modulo the world size; rank 0
merges the manifest at the end. A rerun of the same command redoes only shards without a complete sidecar.

Safety: `--out` must be empty, absent, or a shard folder made with the same settings; rank 0 holds the folder's
lock (`star.lock.folder_lock`) for the whole run, so a second tokenizer on the same folder is refused naming the
holder. One lock per run, taken by rank 0, and not one per rank: every run has a rank 0, so it excludes any
second run whatever its world size, and the one holder it names is the process to look for; per-rank locks
would let a 1-process run and a 2-process run interleave on the shards of rank 1.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import signal
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from star.data.inputs import SHARD_ORDERS, InputPlan, class_member, image_member, open_rgb_image, plan_inputs
from star.data.manifest import Manifest, RejectedInput, ShardEntry, ViewsRecord
from star.data.out_folder import check_output_folder, refuse_foreign_folder, refuse_out_inside_data
from star.data.shards import (
    PLAN_NAME,
    ShardSample,
    ShardWriter,
    iter_tar_groups,
    normalise_key,
    read_sidecar,
    remove_dead_writers_temporaries,
    shard_is_complete,
    shard_name,
    token_dtype,
)
from star.data.views import VIEW_POLICY_CHOICES, ViewPolicy, make_views
from star.downloads import DOWNLOAD_DIR_HELP, fetch_file
from star.io import sha256_file, write_json_atomic
from star.lock import folder_lock
from star.runtime import autocast_dtype, pick_device, resolve_precision
from star.settings import check, check_device, setting

TOKENIZE_PRECISIONS = ("auto", "fp32", "bf16")
MAX_IMAGE_SIZE = 1024  # LlamaGen's VQs are used at 256-512 px; past this a view is mostly memory
MAX_CROP_RANGE = 2.0  # fp16 is not offered: the VQ encoder was trained in fp32/bf16


@dataclass
class TokenizeConfig:
    data: str = setting(help="ImageFolder tree (class/*.jpg) or WebDataset tars of images with `cls`")
    out: str = setting(help="output shard folder: absent, empty, or a shard folder made with the same settings")
    vq_ckpt: str = setting(help="VQ checkpoint (official LlamaGen format: {'model': state_dict}): a path, "
                                "vq_ds16_c2i.pt or a URL")
    download_dir: str = setting("", help=DOWNLOAD_DIR_HELP)
    vq_config: str = setting("VQ-16", help="VQ preset (VQ-16, VQ-8) or JSON file")
    image_size: int = setting(256, help="side of each view in pixels (a multiple of the VQ's downsampling)")
    view_policy: str = setting("tencrop", metavar="POLICY",
                               help=f"crop policy: {' | '.join(VIEW_POLICY_CHOICES)} (1 <= N <= 64)")
    crop_range: float = setting(1.1, help="ADM centre-crop frame = crop_range x image size (>= 1)")
    seed: int = setting(0, help="seed of the random:N views")
    shard_size: int = setting(1000, help="images per shard (folder inputs)")
    shard_order: str = setting("shuffled", choices=SHARD_ORDERS,
                               help="folder inputs: shuffled (images dealt to shards by a permutation seeded by "
                                    "--seed, so every shard holds many classes) or listing (class by class)")
    batch_size: int = setting(16, help="images per encoder batch (each brings all its views)")
    num_workers: int = setting(4, help="DataLoader workers for decoding and cropping")
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N")
    precision: str = setting("auto", choices=TOKENIZE_PRECISIONS, help="encoder precision; auto = bf16 on CUDA, fp32 elsewhere")
    follow_links: bool = setting(False, help="follow symlinks that lead outside --data (by default they are "
                                             "listed as rejected inputs)")
    break_lock: bool = setting(False, help="take over --out's lock even if its holder may be alive")
    progress: bool = setting(True, help="tqdm progress bar")

    def __post_init__(self) -> None:
        for name in ("data", "out", "vq_ckpt"):
            check(bool(getattr(self, name)), f"--{name.replace('_', '-')} is required")
        check(16 <= self.image_size <= MAX_IMAGE_SIZE, f"--image-size must be from 16 to {MAX_IMAGE_SIZE} pixels, got "
              f"{self.image_size}")
        check(math.isfinite(self.crop_range) and 1.0 <= self.crop_range <= MAX_CROP_RANGE,
              f"--crop-range must be a number from 1 to {MAX_CROP_RANGE} (the ten crops are taken inside that "
              f"frame; LlamaGen uses 1.1), got {self.crop_range}")
        check(self.shard_size > 0, f"--shard-size must be > 0, got {self.shard_size}")
        check(self.shard_order in SHARD_ORDERS, f"--shard-order {self.shard_order!r}: choose one of "
              f"{', '.join(SHARD_ORDERS)}")
        check(self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}")
        check(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        check(self.precision in TOKENIZE_PRECISIONS,
              f"--precision {self.precision!r}: choose one of {', '.join(TOKENIZE_PRECISIONS)}")
        check_device(self.device)
        ViewPolicy.parse(self.view_policy)  # raises ValueError naming the choices

    @property
    def policy(self) -> ViewPolicy:
        return ViewPolicy.parse(self.view_policy)


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
        self.root, self.config, self.policy = plan.root, config, config.policy
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
        self.config, self.policy = config, config.policy

    def _record(self, shard_index: int, tar_path: Path, key: str, members: dict) -> dict:
        record = {"shard": shard_index, "source": f"{tar_path.name}:{key}", "key": normalise_key(f"{tar_path.stem}/{key}")}
        try:
            class_id = class_member(members)
            payload = image_member(members)
            if class_id is None or payload is None:
                raise ValueError("sample has no image member or no `cls` member")
            record["class_id"] = class_id
            record.update(_views_payload(open_rgb_image(payload), record["key"], self.config, self.policy))
        except ValueError as error:
            record["error"] = str(error)
        return record

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        mine = self.shard_indices if worker is None else self.shard_indices[worker.id :: worker.num_workers]
        for shard_index in mine:
            tar_path = self.tars[shard_index]
            try:
                for key, members in iter_tar_groups(tar_path):
                    yield self._record(shard_index, tar_path, key, members)
            except (tarfile.TarError, EOFError, OSError) as error:
                yield {"shard": shard_index, "source": str(tar_path), "key": "", "error": f"input tar unreadable: {error}"}
            yield {"shard": shard_index, "end": True}


def _collate(records: list[dict]) -> list[dict]:
    return records


class ExitWithParent:
    """DataLoader `worker_init_fn`: a worker dies with the process that started it, even after `kill -9`.

    Without this a worker blocked flushing its result queue outlives a killed tokenizer indefinitely. On Linux
    the kernel delivers SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls
    the parent pid once a second. Either way, a parent already gone before the worker got here ends it at once.
    """

    PR_SET_PDEATHSIG = 1

    def __init__(self, parent_pid: int):
        self.parent_pid = parent_pid

    def __call__(self, worker_id: int = 0) -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(self.PR_SET_PDEATHSIG, signal.SIGKILL)
        else:
            threading.Thread(target=self._watch, daemon=True, name="exit-with-parent").start()
        if os.getppid() != self.parent_pid:
            os._exit(1)

    def _watch(self) -> None:
        while os.getppid() == self.parent_pid:
            time.sleep(1.0)
        os._exit(1)


def _plan_record(config: TokenizeConfig, plan: InputPlan, encoder: Encoder) -> dict:
    side = config.image_size // encoder.vq_config.downsample
    return {
        "input_fingerprint": plan.fingerprint,
        "input_kind": plan.kind,
        "num_units": plan.num_units,
        "tokenizer_sha256": encoder.tokenizer["checkpoint_sha256"],
        "image_size": config.image_size,
        "grid": [side, side],
        "codebook_size": encoder.vq_config.codebook_size,
        "views": config.view_policy,  # the view policy
        "crop_range": config.crop_range,
        "seed": config.seed,
        "shard_size": config.shard_size,
        "shard_order": config.shard_order if plan.kind == "folder" else "input",
        "precision": encoder.precision,  # bf16 and fp32 tokens may differ: one folder holds one kind
    }


# ----------------------------------------------------------------------------------------------------------
# The tokenizer


@dataclass
class Encoder:
    """The VQ encoder as stage one uses it: model, device and the resolved precision."""

    model: torch.nn.Module
    device: torch.device
    precision: str  # fp32 | bf16
    vq_config: Any
    tokenizer: dict  # the manifest's `tokenizer` record

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return encode_views(self.model, pixels, self.device, autocast_dtype(self.precision))


def _load_encoder(config: TokenizeConfig, device: torch.device) -> Encoder:
    from star.vq.model import VQConfig, load_vq

    vq_config = VQConfig.resolve(config.vq_config)
    if config.image_size % vq_config.downsample:
        raise ValueError(f"--image-size {config.image_size} is not a multiple of the tokenizer's downsampling "
                         f"{vq_config.downsample}")
    checkpoint = fetch_file(config.vq_ckpt, "--vq-ckpt", config.download_dir, config.progress)
    model = load_vq(checkpoint, vq_config).to(device).eval()
    tokenizer = {
        "config": vq_config.to_dict(),
        "config_source": str(config.vq_config),
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": sha256_file(checkpoint),
    }
    return Encoder(model, device, resolve_precision(config.precision, device), vq_config, tokenizer)


@torch.inference_mode()
def encode_views(model, pixels: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> np.ndarray:
    """[N, S, S, 3] uint8 -> token grids [N, h, w] int64, LlamaGen's pixel convention (x / 127.5 - 1).

    dtype: the autocast dtype (None: fp32)."""
    images = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # [N, 3, S, S]
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        indices = model.encode_indices(images)  # [N, h, w]
    return indices.cpu().numpy()


# ----------------------------------------------------------------------------------------------------------
# Writing the records of the DataLoader into their shards


class ShardAssembler:
    """Takes the loader's records in order: samples and rejects go to their shard's writer; an end marker
    closes that shard (tar, then sidecar). `abort()` removes every unfinished shard's temporary file."""

    def __init__(self, out: Path, process_index: int, dtype: np.dtype, bar: tqdm):
        self.out, self.process_index, self.dtype, self.bar = out, process_index, dtype, bar
        self.writers: dict[int, ShardWriter] = {}
        self.counts = {"images": 0, "views": 0, "rejected": 0, "shards_written": 0}

    def _writer(self, shard: int) -> ShardWriter:
        if shard not in self.writers:
            self.writers[shard] = ShardWriter(self.out / shard_name(shard), self.process_index)
        return self.writers[shard]

    def add_batch(self, batch: list[dict], encoder: Encoder) -> None:
        good = [r for r in batch if not r.get("end") and "error" not in r]
        tokens = None
        if good:
            pixels = np.concatenate([r["pixels"] for r in good])  # [sum V, S, S, 3]
            tokens = encoder.encode(pixels).astype(self.dtype)  # [sum V, h, w]
        offset = 0
        for record in batch:
            offset += self.add(record, tokens, offset)

    def add(self, record: dict, tokens: np.ndarray | None, offset: int) -> int:
        """Handle one record; returns how many rows of `tokens` it used."""
        writer = self._writer(record["shard"])
        if record.get("end"):
            self.writers.pop(record["shard"]).close()
            self.counts["shards_written"] += 1
            return 0
        self.bar.update(1)
        if "error" in record:
            writer.reject(record["source"], record["error"])
            self.counts["rejected"] += 1
            return 0
        num_views = len(record["views"])
        writer.write(ShardSample(record["key"], tokens[offset : offset + num_views], record["class_id"],
                                 record["views"], tuple(record["source_size"]), record["source"]))
        self.counts["images"] += 1
        self.counts["views"] += num_views
        return num_views

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def _encode_pending(config: TokenizeConfig, plan: InputPlan, encoder: Encoder, out: Path, state) -> dict:
    """Tokenize this process's shards that are not complete yet; returns the counts of this run."""
    mine = [i for i in range(plan.num_units) if i % state.num_processes == state.process_index]
    pending = [i for i in mine if not shard_is_complete(out / shard_name(i))]
    dataset = (FolderViews if plan.kind == "folder" else TarViews)(plan, pending, config)
    workers = config.num_workers if plan.kind == "folder" else min(config.num_workers, len(pending))
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=workers, collate_fn=_collate,
                        prefetch_factor=2 if workers > 0 else None, persistent_workers=False,
                        worker_init_fn=ExitWithParent(os.getpid()) if workers > 0 else None)
    total_images = sum(len(plan.units[i]) for i in pending) if plan.kind == "folder" else None
    bar = tqdm(total=total_images, unit="img", desc=f"tokenize[{state.process_index}]", dynamic_ncols=True,
               disable=not (config.progress and state.is_main_process))
    assembler = ShardAssembler(out, state.process_index, token_dtype(encoder.vq_config.codebook_size), bar)
    try:
        for batch in loader:
            assembler.add_batch(batch, encoder)
    except BaseException:
        assembler.abort()
        raise
    finally:
        bar.close()
    return assembler.counts


def _distributed_state(device: torch.device):
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")


def run_tokenize(config: TokenizeConfig) -> dict:
    """Run stage one; returns the run summary (rank 0 also writes the merged manifest)."""
    started = time.time()
    out = Path(config.out)
    refuse_out_inside_data(out, config.data)
    refuse_foreign_folder(out)
    device = pick_device(config.device)
    state = _distributed_state(device)
    if state.num_processes > 1 and state.device.type == "cuda":
        device = state.device  # one GPU per process under accelerate launch / torchrun
    plan = plan_inputs(config.data, config.shard_size, config.shard_order, config.seed, config.follow_links)
    encoder = _load_encoder(config, device)
    expected = _plan_record(config, plan, encoder)

    with contextlib.ExitStack() as held:
        if state.is_main_process:  # rank 0 holds the folder for the whole run (see the module docstring)
            held.enter_context(folder_lock(out, f"tokenize/run.py (rank 0 of {state.num_processes})",
                                           break_lock=config.break_lock))
            check_output_folder(out, expected)
            remove_dead_writers_temporaries(out)
            write_json_atomic(out / PLAN_NAME, expected)
        state.wait_for_everyone()
        counts = _encode_pending(config, plan, encoder, out, state)
        state.wait_for_everyone()
        seconds = time.time() - started
        summary = {"process": state.process_index, "images_now": counts["images"], "rejected_now": counts["rejected"],
                   "shards_now": counts["shards_written"], "seconds": round(seconds, 2),
                   "images_per_second": round(counts["images"] / max(seconds, 1e-9), 2)}
        if state.is_main_process:
            manifest = merge_manifest(out, plan, config, encoder)
            summary.update({"images": manifest.num_samples, "rejected": manifest.num_rejected,
                            "views": manifest.num_samples * manifest.num_views, "shards": len(manifest.shards),
                            "out": str(out)})
    return summary


def merge_manifest(out: Path, plan: InputPlan, config: TokenizeConfig, encoder: Encoder) -> Manifest:
    """Rank 0, after every shard is complete: the sidecars and the listing's rejects become `manifest.json`."""
    shards, class_ids = [], set()
    rejected = [RejectedInput(item["path"], item["reason"]) for item in plan.rejected]
    for index in range(plan.num_units):
        tar_path = out / shard_name(index)
        if not shard_is_complete(tar_path):
            raise RuntimeError(f"shard {tar_path} is missing after all processes finished; rerun the same command")
        sidecar = read_sidecar(tar_path)
        shards.append(ShardEntry(tar_path.name, int(sidecar["samples"]), tar_path.stat().st_size))
        rejected.extend(RejectedInput(item["path"], item["reason"]) for item in sidecar["rejected"])
        class_ids.update(sidecar["class_ids"])
    classes = plan.classes
    if plan.kind == "tars":  # tars carry ids only: name each class by its id, 0..max
        classes = {str(i): i for i in range(max(class_ids, default=-1) + 1)}
    policy, vq_config = config.policy, encoder.vq_config
    side = config.image_size // vq_config.downsample
    manifest = Manifest(
        tokenizer=encoder.tokenizer, image_size=config.image_size, grid=(side, side),
        codebook_size=vq_config.codebook_size, token_dtype=str(token_dtype(vq_config.codebook_size)),
        views=ViewsRecord(str(policy), policy.num_views, config.crop_range, config.seed),
        classes=classes, shards=shards, rejected=rejected,
        source={"kind": plan.kind, "data": str(Path(config.data).resolve()), "fingerprint": plan.fingerprint},
        command=" ".join(sys.argv), config=asdict(config),
        versions={"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), precision=encoder.precision,
    )
    manifest.write(out)
    return manifest


def format_summary(summary: dict) -> str:
    lines = ["", "tokenize summary", "----------------"]
    for name in ("images", "views", "rejected", "shards", "images_now", "shards_now", "seconds",
                 "images_per_second", "out"):
        if name in summary:
            lines.append(f"{name:>18}: {summary[name]}")
    return "\n".join(lines)
