"""Stage two's loader: batches of M distinct views per image, from the token cache or streamed from the shards.

The map-style loader reads the memory-mapped token cache (star/train/token_cache.py; ImageNet with ten views is
~6.5 GB of uint16), which makes an epoch a seeded permutation and the data position a pure function of the step and the global
batch: resume is exact, for any number of workers, processes and micro-batches. The stream loader reads the WebDataset shards themselves, local or
remote, for data that does not fit a node.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from star.data.manifest import Manifest
from star.data.shards import decode_sample
from star.runtime import indexed_seed, key_seed

VIEW_MATCH_CHOICES = ("index", "geometry")  # index: the paper's same-raster-index pairs; geometry: same source point


def geometric_match(box_a, flip_a: bool, box_b, flip_b: bool, grid: tuple[int, int]) -> np.ndarray:
    """For each token of view a (raster order), the index of view b's token covering the same source point.

    A token's cell centre is mapped through view a's crop box (un-mirrored if a was flipped) to source pixels,
    then into view b (mirrored if b was flipped). Points outside view b get -1. Returns int64 [h * w].
    """
    h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    u = (cols.ravel() + 0.5) / w  # horizontal position within view a's pixels, 0..1
    v = (rows.ravel() + 0.5) / h
    if flip_a:
        u = 1.0 - u
    ax0, ay0, ax1, ay1 = box_a
    bx0, by0, bx1, by1 = box_b
    source_x = ax0 + u * (ax1 - ax0)
    source_y = ay0 + v * (ay1 - ay0)
    u_b = (source_x - bx0) / (bx1 - bx0)
    v_b = (source_y - by0) / (by1 - by0)
    inside = (u_b >= 0) & (u_b < 1) & (v_b >= 0) & (v_b < 1)
    if flip_b:
        u_b = 1.0 - u_b
    col_b = np.clip(np.floor(u_b * w), 0, w - 1).astype(np.int64)
    row_b = np.clip(np.floor(v_b * h), 0, h - 1).astype(np.int64)
    return np.where(inside, row_b * w + col_b, -1)


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # [B, M, T] int64, the M views' token grids in raster order
    labels: torch.Tensor  # [B] int64
    view_match: torch.Tensor  # [B, M, T] int64: token of view (m+1) % M matching token t of view m, or -1
    indices: torch.Tensor  # [B] int64 which image each row is: the sample index (map loader), a hash of the
    # sample's shard key (stream loader); the InfoNCE terms never use another copy of an image as its negative

    def to(self, device) -> "TokenBatch":
        return TokenBatch(*(t.to(device, non_blocking=True) for t in (self.tokens, self.labels, self.view_match, self.indices)))


class TokenViews(Dataset):
    """Item `epoch * N + i` = sample i with M distinct views drawn by a generator seeded from (seed, epoch, i)."""

    def __init__(self, cache_dir: str | Path, views_per_sample: int, seed: int, view_match: str = "index"):
        cache_dir = Path(cache_dir)
        self.tokens = np.load(cache_dir / "tokens.npy", mmap_mode="r")  # [N, V, h, w]
        self.labels = np.load(cache_dir / "labels.npy")
        self.boxes = np.load(cache_dir / "boxes.npy")
        self.flips = np.load(cache_dir / "flips.npy")
        self.num_samples, self.num_views = self.tokens.shape[:2]
        self.grid = tuple(self.tokens.shape[2:])
        self.views_per_sample, self.seed, self.view_match = views_per_sample, seed, view_match

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, item: int):
        epoch, index = divmod(int(item), self.num_samples)
        rng = np.random.default_rng([self.seed, epoch, index])
        tokens, match = select_views(self.tokens[index], self.boxes[index], self.flips[index], self.views_per_sample,
                                     self.view_match, rng)
        return tokens, int(self.labels[index]), match, index


def select_views(grids: np.ndarray, boxes: np.ndarray, flips: np.ndarray, views_per_sample: int, view_match: str,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """M distinct stored views of one image: tokens [M, T] int64 and, per view m, the token of view (m+1) % M
    matching each of its tokens [M, T] (raster index, or crop geometry with -1 where nothing matches)."""
    if not (1 <= views_per_sample <= len(grids) and view_match in VIEW_MATCH_CHOICES):  # a library caller's values
        # (a run's are checked, with their flags, by TrainConfig and star/train/plan.py)
        raise ValueError(f"select_views: views_per_sample={views_per_sample} of the {len(grids)} stored views, "
                         f"view_match={view_match!r} (one of {', '.join(VIEW_MATCH_CHOICES)})")
    num_views, h, w = grids.shape
    chosen = rng.choice(num_views, size=views_per_sample, replace=False)
    tokens = np.asarray(grids[chosen]).reshape(views_per_sample, h * w).astype(np.int64)  # [M, T]
    if view_match == "index" or views_per_sample == 1:
        return tokens, np.tile(np.arange(h * w), (views_per_sample, 1))
    match = np.stack([geometric_match(boxes[a], flips[a], boxes[b], flips[b], (h, w))
                      for a, b in zip(chosen, np.roll(chosen, -1))])
    return tokens, match


def stream_loader(shards: str | Path, views_per_sample: int, batch_per_rank: int, seed: int, view_match: str,
                  rank: int, workers: int, shuffle_buffer: int = 2000):
    """WebDataset streaming for data that does not fit a node: shards resampled at random per rank and worker
    (no node splitter), a sample shuffle buffer, M views per sample, batches for this rank. Endless; resuming
    starts a fresh random stream (only the map-style loader resumes exactly)."""
    import random

    import webdataset as wds

    manifest = Manifest.load(shards)
    urls, spec = manifest.shard_urls(), manifest.sample_spec  # plain names under the location the user gave
    state = {}

    def to_item(members: dict):
        if "rng" not in state:  # one generator per worker process, distinct across ranks and workers
            info = torch.utils.data.get_worker_info()
            state["rng"] = np.random.default_rng([seed, rank, info.id if info else 0, random.getrandbits(32)])
        sample = decode_sample(members, spec)  # checked against the manifest in the worker, not on the step
        boxes = np.array([view["box"] for view in sample.views], np.float32)
        flips = np.array([view["flip"] for view in sample.views], bool)
        tokens, match = select_views(sample.tokens, boxes, flips, views_per_sample, view_match, state["rng"])
        return tokens, sample.class_id, match, image_id(sample.key)

    dataset = (wds.WebDataset(urls, resampled=True, nodesplitter=None, shardshuffle=False,
                              seed=indexed_seed(seed, rank), empty_check=False)
               .shuffle(shuffle_buffer)
               .map(to_item)
               .compose(distinct_batches(batch_per_rank)))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=leave_signals_to_the_trainer)


def distinct_batches(batch_size: int):
    """A WebDataset stage: TokenBatches of `batch_size` items of distinct images (item[3], the image id). Resampled
    shards, when there are few, bring an image back while its first copy is still in the shuffle buffer; such an
    item waits for the next batch instead of sharing one with itself."""
    def stage(items):
        batch, waiting = {}, []
        for item in items:
            waiting.append(item)
            still_waiting = []
            for candidate in waiting:
                if candidate[3] in batch:
                    still_waiting.append(candidate)
                    continue
                batch[candidate[3]] = candidate
                if len(batch) == batch_size:
                    yield collate_views(list(batch.values()))
                    batch = {}
            waiting = still_waiting

    return stage


def image_id(key: str) -> int:
    """A streamed sample's identity as an int64 (TokenBatch.indices), the same on every process and worker."""
    return key_seed(key, 0) & (2**63 - 1)


def leave_signals_to_the_trainer(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: a scheduler's SIGTERM goes to the whole process group; the workers ignore it
    (as they ignore SIGINT) so the trainer finishes its step and checkpoints while they still serve batches; they
    end with the trainer."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate_views(items) -> TokenBatch:
    tokens, labels, matches, indices = zip(*items)
    return TokenBatch(torch.from_numpy(np.stack(tokens)), torch.tensor(labels), torch.from_numpy(np.stack(matches)),
                      torch.tensor(indices))


class EpochBatchSampler(Sampler):
    """Endless micro-batches for one rank, a function of (seed, global batch, step) alone: each epoch a seeded
    permutation cut into global batches (tail dropped); each step's global batch is cut into `micro_batches`
    consecutive micro-batches, and each of those into `world` consecutive rank slices.

    A step reads the same images on any number of processes and any accumulation at the same global batch, and
    starting at `start_step` reads exactly what an uninterrupted run would have read from that step on.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world: int, seed: int,
                 micro_batches: int = 1, start_step: int = 0):
        # a library caller's values (a run's are checked, with its flags, by star/train/plan.py): a wrong split
        # would read the wrong images silently
        if not (0 < global_batch <= num_samples and global_batch % (world * micro_batches) == 0):
            raise ValueError(f"EpochBatchSampler: global batch {global_batch} must be a multiple of processes x "
                             f"micro-batches = {world} x {micro_batches} and at most the {num_samples} samples")
        self.batch_per_rank = global_batch // (world * micro_batches)
        self.steps_per_epoch = num_samples // global_batch
        self.num_samples, self.global_batch, self.rank, self.world = num_samples, global_batch, rank, world
        self.seed, self.micro_batches, self.start_step = seed, micro_batches, start_step

    def __iter__(self):
        step = self.start_step
        micro_span = self.global_batch // self.micro_batches  # images of one micro-batch over all ranks
        while True:
            epoch, within = divmod(step, self.steps_per_epoch)
            generator = torch.Generator().manual_seed(indexed_seed(self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=generator)
            for position in range(within, self.steps_per_epoch):
                batch = order[position * self.global_batch : (position + 1) * self.global_batch]
                for micro in range(self.micro_batches):
                    first = micro * micro_span + self.rank * self.batch_per_rank
                    yield (batch[first : first + self.batch_per_rank] + epoch * self.num_samples).tolist()
            step = (epoch + 1) * self.steps_per_epoch


def first_global_row(micro: int, rank: int, world: int, batch_per_process: int) -> int:
    """Where a process's micro-batch sits in its optimizer step's global batch (`EpochBatchSampler`'s layout: a
    step reads grad_accum consecutive world-wide slices, each cut into the processes' batches in rank order)."""
    return (micro * world + rank) * batch_per_process


def make_loader(plan, accelerator, cache: Path | None, start_step: int = 0):
    """The training loader of a run's plan from `start_step` on: the map loader over the token cache (the same
    images at a step on any launch of the same global batch), or the stream loader over the shards (a fresh
    random stream)."""
    config, rank = plan.config, accelerator.process_index
    if config.loader == "stream":
        return stream_loader(config.shards, plan.views_per_image, plan.batch_per_process,
                             indexed_seed(config.seed, start_step), config.view_match, rank, config.num_workers)
    dataset = TokenViews(cache, plan.views_per_image, config.seed, config.view_match)
    sampler = EpochBatchSampler(len(dataset), config.batch_size, rank, plan.world_size, config.seed,
                                micro_batches=config.grad_accum, start_step=start_step)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers, collate_fn=collate_views,
                      pin_memory=accelerator.device.type == "cuda", persistent_workers=config.num_workers > 0,
                      worker_init_fn=leave_signals_to_the_trainer)
