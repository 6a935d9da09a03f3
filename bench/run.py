"""`make bench`: speed ratios against baselines measured in the same run (machines here are noisy).

Contenders run interleaved, round after round, and each figure is a MEDIAN over rounds (the CPUs here are
shared with other jobs); everything goes to bench/results/latest.json with the hardware named.

- train_steps: at two sizes (dim 384 x 6 layers and dim 512 x 8 layers; vocab 16384, 256 tokens, 8 sequences),
  LlamaGen's own step (bench/llamagen_ref.py: its model structure, full float32 logits + F.cross_entropy,
  foreach AdamW as on CPU) vs our trainer's plain step vs our ST-AR step on 4 images x 2 views;
  `--compile` compiles our model (LlamaGen's baseline stays eager; a compiled baseline is reported beside it);
- train_steps_bf16: the same three steps, all under bf16 autocast (both train in bf16 on GPUs; AMX on this CPU);
- recipe_steps: ST-AR's steps at the trainer's unit, 8 images (dim 384 x 6 layers): the plain step vs the paper's
  two views vs one view with L_MIM and L_step (`--views-per-image 1 --no-view`, the cheaper step; target <= 1.4x)
  vs one view with `--star-every 2` (bench/step_bench.py `bench_recipe_steps`; the ratios printed);
- profile: the torch.profiler table of one ST-AR step (printed);
- sample: our generate vs LlamaGen's algorithm (whole-cache attention with its mask, batched CFG) at batch 8
  and 64, same weights; with `--compile`, sample_compiled: both decoders compiled, at batch 8;
- tokenize: batched encoding of all views with DataLoader workers vs a naive one-image-at-a-time loop;
- loader: batches/s the token loader delivers vs the training steps/s it must feed;
- train_loop: our full trainer's steady-state step (plain, --no-star) vs a bare loop over the same data: the
  trainer adds no per-step overhead around the step measured in train_steps;
- study_step: the study's step (dim 128, 4 layers, 8x8 tokens) the default way vs the long preset's fast way
  (bench/study_step.py);
- scale: the ImageNet-layout rehearsal at 20k images (bench/scale.py: cache build, loaders, classes per batch,
  manifest checks, samples.npz assembly memory).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/llamagen_ref.py, bench/step_bench.py

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llamagen"


def hardware() -> dict:
    from star.runtime import cpu_description

    info = {"cpu": cpu_description()[0], "cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bench_tokenize(work: Path) -> dict:
    from star.data.builtin import build_builtin_dataset
    from star.data.extract import TokenizeConfig, run_tokenize
    from star.data.inputs import open_rgb_image
    from star.data.views import ViewPolicy, make_views
    from star.vq.model import VQConfig, load_vq

    build_builtin_dataset(work / "data", train_per_class=12, val_per_class=1, image_size=72)
    vq_ckpt, vq_json = FIXTURES / "vq_small.pt", FIXTURES / "vq_small.json"
    images = sorted((work / "data" / "train").rglob("*.png"))

    def ours():
        out = work / f"shards-{time.perf_counter_ns()}"
        run_tokenize(TokenizeConfig(data=str(work / "data" / "train"), out=str(out), vq_ckpt=str(vq_ckpt),
                                    vq_config=str(vq_json), image_size=32, batch_size=32, num_workers=1, progress=False))

    vq = load_vq(vq_ckpt, VQConfig.resolve(vq_json))

    def naive():  # LlamaGen's extraction loop: batch_size=1, decode, crop and encode one image at a time
        for path in images:
            views = make_views(open_rgb_image(path), ViewPolicy.parse("tencrop"), 32, 1.1, "k", 0)
            for view in views:
                pixels = torch.from_numpy(view.pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
                with torch.inference_mode():
                    vq.encode_indices(pixels)

    from step_bench import interleaved

    timed = interleaved({"ours": ours, "naive": naive}, rounds=3)  # wall time: ours uses a worker process
    ours_s, naive_s = timed["ours"]["median_s"], timed["naive"]["median_s"]
    return {"images": len(images), "ours_s": ours_s, "baseline_s": naive_s, "speedup": naive_s / ours_s,
            "ours_images_per_s": len(images) / ours_s, "rounds": 3, "target": "speedup >= 2"}


def tiny_batch(model_config, batch: int, views: int):
    from star.train.token_loader import TokenBatch

    tokens = torch.randint(0, model_config.vocab_size, (batch, views, model_config.block_size))
    match = torch.arange(model_config.block_size).expand(batch, views, -1).clone()
    return TokenBatch(tokens, torch.randint(0, model_config.num_classes, (batch,)), match, torch.arange(batch))


def activation_bytes(run_step) -> int:
    """Bytes of distinct tensors autograd saves for backward during one step: the activation memory that
    dominates a training step's peak, measurable on a CPU (a GPU run should also read max_memory_allocated)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run_step()
    return sum(seen.values())


def bench_loader(work: Path) -> dict:
    from torch.utils.data import DataLoader

    from star.data.extract import TokenizeConfig, run_tokenize
    from star.train.token_cache import build_token_cache
    from star.train.token_loader import EpochBatchSampler, TokenViews, collate_views

    out = work / "loader-shards"
    run_tokenize(TokenizeConfig(data=str(work / "data" / "train"), out=str(out), vq_ckpt=str(FIXTURES / "vq_small.pt"),
                                vq_config=str(FIXTURES / "vq_small.json"), image_size=32, num_workers=0, progress=False))
    dataset = TokenViews(build_token_cache(out), 2, 0, "geometry")
    loader = DataLoader(dataset, batch_sampler=EpochBatchSampler(len(dataset), 32, 0, 1, 0), num_workers=0,
                        collate_fn=collate_views)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(50):
        next(iterator)
    batches_per_s = 50 / (time.perf_counter() - start)
    return {"batch": 32, "views": 2, "view_match": "geometry", "loader_batches_per_s": batches_per_s,
            "target": "far above the trainer's steps/s (one worker process, no GPU)"}


def bench_train_loop(work: Path) -> dict:
    """Our trainer (--no-star, Accelerate, logging, NaN guard) vs a bare LlamaGen-style loop over the same data."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from star.gpt.model import GPT, GPTConfig
    from star.train.loop import TrainConfig, train
    from star.train.objectives import drop_class_labels
    from star.train.token_cache import build_token_cache
    from star.train.token_loader import EpochBatchSampler, TokenViews, collate_views

    shards = work / "loader-shards"  # written by bench_loader
    model_spec = {"dim": 128, "n_layer": 4, "n_head": 4, "vocab_size": 256, "num_classes": 8, "block_size": 64}
    (work / "model.json").write_text(json.dumps(model_spec))
    steps, batch = 60, 32
    train(TrainConfig(shards=str(shards), out=str(work / "loop-run"), model=str(work / "model.json"), steps=steps,
                      batch_size=batch, self_guided=False, num_workers=0, log_every=20, ckpt_every=10**9,
                      progress=False))
    log = [json.loads(line) for line in (work / "loop-run" / "log.jsonl").read_text().splitlines()]
    ours = (log[-1]["time"] - log[0]["time"]) / (log[-1]["step"] - log[0]["step"])  # steady state, no start-up

    torch.manual_seed(0)
    model = GPT(GPTConfig.resolve(model_spec)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.25e-5, betas=(0.9, 0.95), weight_decay=0.05)
    dataset = TokenViews(build_token_cache(shards), 1, 0)
    batches = iter(DataLoader(dataset, batch_sampler=EpochBatchSampler(len(dataset), batch, 0, 1, 0), num_workers=0,
                              collate_fn=collate_views))

    def one_step():
        data = next(batches)
        tokens = data.tokens[:, 0]  # [B, T]
        labels = drop_class_labels(data.labels, 0.1, 8)
        logits = model(tokens[:, :-1], labels).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(20):
        one_step()
    start = time.perf_counter()
    for _ in range(steps - 20):
        one_step()
    baseline = (time.perf_counter() - start) / (steps - 20)
    return {"batch": batch, "ours_s_per_step": ours, "baseline_s_per_step": baseline, "ratio": ours / baseline,
            "target": "ratio <= 1 (+ noise): the trainer adds no per-step overhead"}


def _print_summary(name: str, result: dict) -> None:
    def rounded(value):
        if isinstance(value, float):
            return round(value, 4)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return value

    print(f"{name}: {json.dumps(rounded(result))}", flush=True)


def recipe_line(result: dict) -> str:
    """The cheaper ST-AR step's cost against the plain one, at the same --batch-size."""
    return (f"ST-AR step / plain step at {result['images']} images: two views {result['two_views_over_plain']:.2f}x, "
            f"one view (--views-per-image 1 --no-view) {result['one_view_over_plain']:.2f}x, one view with "
            f"--star-every 2 {result['one_view_every_2_over_plain']:.2f}x; chosen: {result['chosen']} "
            f"{result['chosen_over_plain']:.2f}x ({result['target']})")


def planned_benches(args, thread_counts: list[int], work: Path) -> list[tuple]:
    """(result key, name for --only, torch threads, function): the step and sampling comparisons at each thread
    count (the first is the headline; the others are keyed NAME_Nthreads), the rest once on every core."""
    from step_bench import (
        bench_recipe_steps,
        bench_sampling,
        bench_sampling_compiled,
        bench_train_steps,
        profile_star_step,
    )

    every_core = os.cpu_count() or 1
    benches = [("profile", "profile", thread_counts[0], profile_star_step)]
    for index, threads in enumerate(thread_counts):
        suffix = "" if index == 0 else f"_{threads}threads"
        benches.append((f"train_steps{suffix}", "train_steps", threads, lambda: bench_train_steps(args.rounds, False)))
        if index == 0:
            benches.append(("train_steps_bf16", "train_steps_bf16", threads,
                            lambda: bench_train_steps(args.rounds, False, bf16=True)))
            benches.append(("recipe_steps", "recipe_steps", threads, lambda: bench_recipe_steps(args.rounds)))
        if args.compile and index == 0:
            benches.append(("train_steps_compiled", "train_steps_compiled", threads,
                            lambda: bench_train_steps(args.rounds, True)))
        benches.append((f"sample{suffix}", "sample", threads, bench_sampling))
        if args.compile and index == 0:
            benches.append(("sample_compiled", "sample_compiled", threads, bench_sampling_compiled))
    from scale import rehearse
    from study_step import bench_study_step

    return benches + [("tokenize", "tokenize", every_core, lambda: bench_tokenize(work)),
                      ("loader", "loader", every_core, lambda: bench_loader(work)),
                      ("train_loop", "train_loop", every_core, lambda: bench_train_loop(work)),
                      ("study_step", "study_step", every_core, lambda: bench_study_step(rounds=2)),
                      ("scale", "scale", every_core, lambda: rehearse(20_000, work / "scale"))]


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per training-step comparison")
    parser.add_argument("--compile", action="store_true", help="also time training steps and sampling compiled "
                        "(torch.compile), ours and LlamaGen's")
    parser.add_argument("--only", default="", help="comma-separated subset: train_steps,train_steps_bf16,"
                        "train_steps_compiled,recipe_steps,profile,sample,sample_compiled,tokenize,loader,train_loop,study_step,"
                        "scale")
    parser.add_argument("--threads", default="1,all", help="torch thread counts for the step and sampling "
                        "comparisons, comma-separated ('all' = every core); the first is the headline, each other "
                        "count writes KEY_Nthreads. Tokenize, loader and train_loop run once, on every core")
    parser.add_argument("--merge", action="store_true", help="update bench/results/latest.json with the benchmarks "
                        "run now, keeping the other entries (for --only runs)")
    args = parser.parse_args()
    thread_counts = list(dict.fromkeys((os.cpu_count() or 1) if t == "all" else int(t)
                                       for t in args.threads.split(",")))  # "1,all" on one core: once
    results = {"hardware": hardware(), "when": time.strftime("%Y-%m-%d %H:%M"), "thread_counts": thread_counts,
               "note": "medians over interleaved rounds; 1 thread: CPU-time ratios; more: wall-time ratios"}
    wanted = set(filter(None, args.only.split(","))) or None
    with tempfile.TemporaryDirectory() as tmp:
        for key, name, threads, fn in planned_benches(args, thread_counts, Path(tmp)):
            if wanted is not None and name not in wanted:
                continue
            torch.set_num_threads(threads)
            if name == "profile":
                print(f"profile of one ST-AR step (dim 384, 6 layers, 4 images x 2 views, {threads} threads):")
                print(fn(), flush=True)
                continue
            if name == "train_loop" and wanted is not None and "loader" not in wanted:
                bench_loader(Path(tmp))  # writes the shards train_loop reads
            results[key] = fn()
            _print_summary(f"{key} ({threads} threads)", results[key])
            if name == "recipe_steps":
                print(recipe_line(results[key]), flush=True)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    if args.merge and (out / "latest.json").is_file():
        results = {**json.loads((out / "latest.json").read_text()), **results}
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"written: {out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
