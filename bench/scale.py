"""A scale rehearsal for ImageNet on a GPU cluster, run on this machine at a fraction of the size.

Synthetic token shards at ImageNet's layout (1,000 classes listed class by class, ten views, 16x16 tokens of a
16,384 codebook) are written through the real writer, in the order tokenize deals them (shuffled) and in listing
order, then: the token cache's build (one worker vs every core), the loaders' samples/s (map and stream), the
classes per 256-image batch, the manifest check (sizes vs every tar header) and the memory of assembling a
samples.npz. Each figure is extrapolated to 1.28M images x 10 views with the formula printed beside it.

    python bench/scale.py --images 20000        # writes bench/results/scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGENET = 1_281_167
BATCH = 256


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def classes_per_batch(shards: Path, batches: int = 20) -> float:
    from star.train.token_loader import stream_loader

    stream = iter(stream_loader(shards, 2, BATCH, seed=0, view_match="index", rank=0, workers=0))
    return float(statistics.mean(len(set(next(stream).labels.tolist())) for _ in range(batches)))


def loader_rates(shards: Path, cache: Path, batches: int = 30) -> dict:
    from torch.utils.data import DataLoader

    from star.train.token_loader import EpochBatchSampler, TokenViews, collate_views, stream_loader

    dataset = TokenViews(cache, 2, 0, "index")
    loaders = {
        "map": DataLoader(dataset, batch_sampler=EpochBatchSampler(len(dataset), BATCH, 0, 1, 0), num_workers=0,
                          collate_fn=collate_views),
        "stream": stream_loader(shards, 2, BATCH, seed=0, view_match="index", rank=0, workers=0),
    }
    rates = {}
    for name, loader in loaders.items():
        stream = iter(loader)
        next(stream)
        _, seconds = timed(lambda stream=stream: [next(stream) for _ in range(batches)])
        rates[name] = batches * BATCH / seconds
    return rates


MERGE = """
import sys, tracemalloc, numpy as np
from pathlib import Path
sys.path.insert(0, {repo!r})
from star.eval.sample import SampleConfig
from star.eval.sample_store import assemble, part_path
parts, batches, per_batch, mode = Path({parts!r}), {batches}, {per_batch}, {mode!r}
labels = np.arange(batches * per_batch) % 1000
config = SampleConfig(ckpt="x", out={out!r}, vq_ckpt="x", num_samples=len(labels), batch_size=per_batch)
tracemalloc.start()  # numpy reports its buffers to tracemalloc: the peak of what the assembly holds
if mode == "stream":
    assemble(parts, batches, labels, config, {{}})
else:  # holding every batch, their concatenation and a reordered copy, then one np.savez
    loaded = [np.load(part_path(parts, b))["images"] for b in range(batches)]
    images = np.concatenate(loaded)[np.argsort(np.arange(len(labels)))]
    np.savez(Path({out!r}) / "concat.npz", arr_0=images, labels=labels)
print(tracemalloc.get_traced_memory()[1])
"""


def merge_memory(work: Path, batches: int = 16, per_batch: int = 64, side: int = 256) -> dict:
    """Peak memory of assembling sampling's batches into samples.npz (streamed, as sample does) against holding
    them all (a concatenation and a reordered copy: the way of the previous sampler), each in a fresh process."""
    from star.eval.sample_store import write_part

    parts = work / "parts"
    parts.mkdir()
    (work / "out").mkdir()
    rng = np.random.default_rng(0)
    for index in range(batches):
        images = rng.integers(0, 255, (per_batch, side, side, 3), dtype=np.uint8)
        write_part(parts, index, np.zeros((per_batch, 256), np.int64), images)
    peaks = {}
    for mode in ("stream", "concat"):
        script = MERGE.format(repo=str(REPO), parts=str(parts), batches=batches, per_batch=per_batch,
                              out=str(work / "out"), mode=mode)
        peaks[mode] = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                         check=True).stdout)
    image_bytes = batches * per_batch * side * side * 3
    return {"images": batches * per_batch, "side": side, "image_bytes": image_bytes, "batch_bytes":
            per_batch * side * side * 3, "peak_stream_bytes": peaks["stream"], "peak_concat_bytes": peaks["concat"],
            "stream_over_images": peaks["stream"] / image_bytes, "concat_over_images": peaks["concat"] / image_bytes}


def rehearse(images: int, work: Path) -> dict:
    """Every measurement, in a fresh `work` folder; the figures extrapolated to ImageNet beside them."""
    from star.data.manifest import Manifest
    from star.data.synthetic import SyntheticLayout, write_synthetic_shards
    from star.train.token_cache import build_token_cache

    work.mkdir(parents=True, exist_ok=True)
    layout = SyntheticLayout(images)  # ImageNet: 1000 classes, 16x16 tokens, ten views
    shuffled, write_s = timed(lambda: write_synthetic_shards(work / "shuffled", layout, shard_size=1000))
    write_synthetic_shards(work / "listing", layout, shard_size=1000, order="listing")
    cores = os.cpu_count() or 1
    _, serial_s = timed(lambda: build_token_cache(work / "shuffled", work / "cache-serial", workers=1))
    cache, parallel_s = timed(lambda: build_token_cache(work / "shuffled", work / "cache-parallel", workers=cores))
    manifest, load_s = timed(lambda: Manifest.load(work / "shuffled"))
    _, verify_s = timed(manifest.verify)
    _, full_s = timed(lambda: manifest.verify(full=True))
    rates = loader_rates(work / "shuffled", cache)
    global_shuffle = 1000 * (1 - (1 - 1 / 1000) ** BATCH)
    shards_at_scale = IMAGENET // 1000 + 1
    per_image = serial_s / images
    result = {
        "images": images, "shards": len(shuffled.shards), "cores": cores, "write_s": write_s,
        "cache_serial_s": serial_s, "cache_parallel_s": parallel_s, "cache_speedup": serial_s / parallel_s,
        "cache_images_per_core_s": images / serial_s,
        "cache_at_imagenet": {
            "formula": "1.28M x (serial s / images) / (workers x efficiency); efficiency = speedup / cores here",
            "one_worker_min": IMAGENET * per_image / 60,
            "8_workers_min": IMAGENET * per_image / (8 * (serial_s / parallel_s) / cores) / 60,
            "32_workers_min": IMAGENET * per_image / (32 * (serial_s / parallel_s) / cores) / 60},
        "loader_samples_per_s": rates, "loader_needed": "GPT-B on 8 H100s: ~2-3k images/s per node (LlamaGen)",
        "classes_per_batch": {"stream_shuffled": classes_per_batch(work / "shuffled"),
                              "stream_listing": classes_per_batch(work / "listing"),
                              "global_shuffle": global_shuffle},
        "manifest": {"load_s": load_s, "verify_sizes_s": verify_s, "verify_headers_s": full_s,
                     "formula": "x 1282 shards / shards here",
                     "at_imagenet_sizes_s": verify_s * shards_at_scale / len(shuffled.shards),
                     "at_imagenet_headers_s": full_s * shards_at_scale / len(shuffled.shards)},
        "merge": merge_memory(work),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    merge = result["merge"]
    images_50k = 50_000 * 256 * 256 * 3
    merge["at_50k_256px"] = {"image_bytes": images_50k, "stream_peak_bytes": merge["peak_stream_bytes"],
                             "concat_peak_bytes": merge["concat_over_images"] * images_50k,
                             "formula": "streamed: a few batches (does not grow with N); held whole: ratio x image bytes"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = rehearse(args.images, Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    c, m = result["classes_per_batch"], result["merge"]
    print(f"cache: {result['cache_serial_s']:.1f} s serial, {result['cache_parallel_s']:.1f} s on "
          f"{result['cores']} cores; at 1.28M x 10: {result['cache_at_imagenet']['one_worker_min']:.1f} min on one "
          f"worker, {result['cache_at_imagenet']['8_workers_min']:.1f} min on 8")
    print(f"loader: map {result['loader_samples_per_s']['map']:.0f} samples/s, stream "
          f"{result['loader_samples_per_s']['stream']:.0f} samples/s")
    print(f"classes per {BATCH} batch: stream {c['stream_shuffled']:.0f} (shuffled shards), {c['stream_listing']:.0f} "
          f"(class-ordered), global shuffle {c['global_shuffle']:.0f}")
    print(f"manifest check at ImageNet: sizes {result['manifest']['at_imagenet_sizes_s']:.2f} s, every header "
          f"{result['manifest']['at_imagenet_headers_s']:.1f} s")
    print(f"samples.npz assembly of {m['image_bytes'] / 2**20:.0f} MB of images: peak {m['peak_stream_bytes'] / 2**20:.0f}"
          f" MB streamed ({m['stream_over_images']:.2f}x), {m['peak_concat_bytes'] / 2**20:.0f} MB held whole "
          f"({m['concat_over_images']:.2f}x); one batch is {m['batch_bytes'] / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
