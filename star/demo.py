"""`make demo`: the whole pipeline on the built-in photo dataset, on a laptop CPU, in a few minutes.

data -> small VQ (cached) -> ten-crop token shards -> a small GPT trained with ST-AR -> CFG samples (grid PNG)
-> FID against the held-out split -> linear probe per step -> a one-screen summary. Each stage is the same
library code that the stage commands call; every output lands under runs/demo/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from star.io import atomic_path, write_json_atomic

ROOT = Path("runs/demo")
DATA = Path("data/builtin")
IMAGE_SIZE = 32  # 8x8 tokens through a downsample-4 VQ: what 2 CPU cores train in minutes
DATA_IMAGE_SIZE = 40  # the built-in crops; the ten-crop frame is int(1.1 * 32) = 35 px
VQ_CONFIG = {"codebook_size": 512, "codebook_embed_dim": 8, "encoder_ch_mult": [1, 2, 2],
             "decoder_ch_mult": [1, 2, 2], "z_channels": 64, "ch": 32, "num_res_blocks": 1}
GPT_CONFIG = {"dim": 128, "n_layer": 4, "n_head": 4, "num_classes": 8, "block_size": 64, "multiple_of": 64,
              "token_dropout_p": 0.1, "resid_dropout_p": 0.1, "ffn_dropout_p": 0.1}


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def stage_vq(steps: int) -> tuple[Path, Path, dict]:
    from star.vq.train import VQTrainConfig, train_vq

    out = ROOT / "vq"
    ckpt, config, metrics = out / "vq.pt", out / "vq.json", out / "metrics.json"
    if ckpt.is_file() and config.is_file() and metrics.is_file():
        print(f"cached: {ckpt}")
        return ckpt, config, json.loads(metrics.read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "vq_config_in.json").write_text(json.dumps({"config": VQ_CONFIG}, indent=2))
    result = train_vq(VQTrainConfig(data_root=str(DATA / "train"), out_dir=str(out), vq_config=str(out / "vq_config_in.json"),
                                    image_size=IMAGE_SIZE, steps=steps, batch_size=16, resume="auto"))
    return ckpt, config, result


def stage_tokenize(vq_ckpt: Path, vq_config: Path) -> dict:
    from star.data.extract import TokenizeConfig, format_summary, run_tokenize

    summaries = {}
    for split, views in (("train", "tencrop"), ("val", "center")):
        summary = run_tokenize(TokenizeConfig(data=str(DATA / split), out=str(ROOT / "shards" / split),
                                              vq_ckpt=str(vq_ckpt), vq_config=str(vq_config), image_size=IMAGE_SIZE,
                                              view_policy=views, shard_size=256, batch_size=32, num_workers=0))
        print(format_summary(summary))
        summaries[split] = summary
    return summaries


def stage_train(vq_codebook: int, steps: int, batch_size: int, star: bool, name: str, view_match: str = "index",
                seed: int = 0) -> Path:
    from star.train.loop import TrainConfig, train

    model_json = ROOT / "gpt_config.json"
    model_json.write_text(json.dumps({**GPT_CONFIG, "vocab_size": vq_codebook}, indent=2))
    out = ROOT / name
    train(TrainConfig(shards=str(ROOT / "shards" / "train"), out=str(out), model=str(model_json), steps=steps,
                      batch_size=batch_size, lr=1e-3, num_workers=0, log_every=25, ckpt_every=steps, star=star,
                      resume="auto", projector_hidden=256, view_match=view_match, seed=seed))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vq-steps", type=int, default=400)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples-per-class", type=int, default=32)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the --no-star LlamaGen baseline")
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed (runs get their own folders)")
    parser.add_argument("--view-match", default="index", choices=["index", "geometry"],
                        help="ST-AR's L_view matching: raster index (the paper) or crop geometry")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.time()
    timings = {}

    def timed(name, fn, *a, **k):
        t = time.time()
        result = fn(*a, **k)
        timings[name] = time.time() - t
        return result

    from star.data.builtin import build_builtin_dataset

    banner("1/6 built-in dataset (scikit-image / scikit-learn photos)")
    spec = timed("data", build_builtin_dataset, DATA, image_size=DATA_IMAGE_SIZE)
    print(f"{len(spec['classes'])} classes x ({spec['train_per_class']} train + {spec['val_per_class']} held-out) "
          f"images at {spec['image_size']} px in {DATA}/")

    banner("2/6 VQ tokenizer (trained once, then cached)")
    vq_ckpt, vq_config, vq_metrics = timed("vq", stage_vq, args.vq_steps)
    codebook = json.loads(vq_config.read_text())
    codebook = (codebook.get("config", codebook))["codebook_size"]

    banner("3/6 tokenize: ten crops per training image, the centre crop per held-out image")
    timed("tokenize", stage_tokenize, vq_ckpt, vq_config)

    banner("4/6 train a small GPT with ST-AR")
    suffix = ("" if args.view_match == "index" else f"_{args.view_match}") + (f"_seed{args.seed}" if args.seed else "")
    run = timed("train", stage_train, codebook, args.train_steps, args.batch_size, True, f"gpt_star{suffix}",
                args.view_match, args.seed)
    runs = {"ST-AR" if args.view_match == "index" else f"ST-AR ({args.view_match})": run}
    if not args.no_baseline:
        banner("4b/6 train the same GPT without ST-AR (baseline)")
        runs["LlamaGen"] = timed("train_baseline", stage_train, codebook, args.train_steps, args.batch_size, False,
                                 "gpt_baseline" + (f"_seed{args.seed}" if args.seed else ""), "index", args.seed)

    from star.data.manifest import shard_tokens
    from star.eval.metrics import compute_metrics, format_report
    from star.eval.sample import SampleConfig, run_sampling
    from star.eval.understanding import probe
    from star.gpt.generate import SamplingSettings
    from star.plots import plot_probe_curves

    results = {}
    banner("5/6 the tokenizer's ceiling: FID of held-out images decoded from their tokens")
    ceiling = timed("fid_vq_ceiling", vq_ceiling, vq_ckpt, vq_config, compute_metrics)
    print(format_report(ceiling))
    control = timed("fid_control", held_out_control, compute_metrics)
    train_x, train_y = shard_tokens(ROOT / "shards" / "train", view=4)  # the unflipped centre crop
    test_x, test_y = shard_tokens(ROOT / "shards" / "val", view=0)
    curves = {}
    for label, run_dir in runs.items():
        banner(f"5/6 sample with CFG {args.cfg_scale} and score ({label})")
        sample_dir = ROOT / "samples" / run_dir.name
        t = time.time()
        run_sampling(SampleConfig(ckpt=str(run_dir), out=str(sample_dir), vq_ckpt=str(vq_ckpt), vq_config=str(vq_config),
                                  sampling=SamplingSettings(cfg_scale=args.cfg_scale),
                                  num_samples=args.samples_per_class * GPT_CONFIG["num_classes"],
                                  batch_size=64, seed=args.seed))
        timings[f"sample_{run_dir.name}"] = time.time() - t
        t = time.time()
        metrics = compute_metrics(sample_dir / "samples.npz", DATA / "val", cache_dir=ROOT / "fid_cache")
        timings[f"fid_{run_dir.name}"] = time.time() - t
        write_json_atomic(sample_dir / "metrics.json", metrics)
        print(format_report(metrics))

        banner(f"6/6 linear probe per step, layer {GPT_CONFIG['n_layer'] // 2} ({label})")
        from star.checkpoint import load_generator

        model = load_generator(str(run_dir))
        steps = [8, 16, 24, 32, 40, 48, 56, 64]  # step t = sequence position t - 1
        rows = probe(model, train_x, train_y, test_x, test_y, GPT_CONFIG["n_layer"] // 2, steps)
        curves[label] = rows
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        results[label] = {"metrics": metrics, "probe": rows, "final_loss_ar": log[-1]["loss_ar"], "run": str(run_dir),
                          "grid": str(sample_dir / "grid.png"), "samples": str(sample_dir / "samples.npz")}
    probe_png = plot_probe_curves(curves, ROOT / f"probe{suffix}.png", chance=1 / GPT_CONFIG["num_classes"])

    summary = render_summary(results, ceiling, control, vq_metrics, timings, time.time() - started, probe_png)
    (ROOT / "summary.md").write_text(summary + "\n")
    print("\n" + summary)
    return 0


def vq_ceiling(vq_ckpt: Path, vq_config: Path, compute_metrics) -> dict:
    """Held-out centre crops -> tokens (from the val shards) -> decoded images, scored like samples: the best
    FID any generator over these tokens can reach here."""
    from star.data.manifest import shard_tokens
    from star.eval.sample import tokens_to_uint8
    from star.vq.model import VQConfig, load_vq

    cached = ROOT / "vq" / "ceiling_metrics.json"
    if cached.is_file() and cached.stat().st_mtime >= vq_ckpt.stat().st_mtime:
        return json.loads(cached.read_text())
    tokens, _ = shard_tokens(ROOT / "shards" / "val", view=0)
    vq = load_vq(vq_ckpt, VQConfig.resolve(vq_config))
    images = tokens_to_uint8(vq, torch.from_numpy(tokens), int(tokens.shape[1] ** 0.5))
    metrics = compute_metrics(images, DATA / "val", cache_dir=ROOT / "fid_cache")
    write_json_atomic(cached, metrics)
    return metrics


def held_out_control(compute_metrics) -> dict:
    """Held-out half against held-out half: what FID / precision / recall read for two sets of REAL images of
    this size, the floor every row of the table is to be read against."""
    import numpy as np

    from star.eval.reference import image_source

    images = np.stack(list(image_source(DATA / "val")))  # [N, H, W, 3], in file order (classes interleaved below)
    first, second = images[0::2], images[1::2]
    reference = ROOT / "fid_cache" / "held_out_second_half.npz"
    reference.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(reference) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, arr_0=second)
    return compute_metrics(first, reference, cache_dir=ROOT / "fid_cache")


def render_summary(results: dict, ceiling: dict, control: dict, vq_metrics: dict, timings: dict, seconds: float,
                   probe_png: Path) -> str:
    lines = ["ST-AR demo: summary", "===================",
             f"data      : {DATA}/ (8 photo classes; train / held-out split)",
             f"tokenizer : {ROOT / 'vq' / 'vq.pt'}  held-out PSNR {vq_metrics['holdout_psnr']:.2f} dB, "
             f"codebook usage {100 * vq_metrics['holdout_codebook_usage']:.1f}%",
             f"shards    : {ROOT / 'shards'}/{{train,val}}",
             "",
             "| model | FID vs held-out | Precision | Recall | probe acc. (last step) | final L_AR |",
             "|---|---|---|---|---|---|"]
    for label, result in results.items():
        m = result["metrics"]
        lines.append(f"| {label} | {m['fid']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | "
                     f"{result['probe'][-1]['accuracy']:.3f} | {result['final_loss_ar']:.3f} |")
    lines.append(f"| VQ reconstructions (ceiling) | {ceiling['fid']:.2f} | {ceiling['precision']:.3f} | "
                 f"{ceiling['recall']:.3f} | - | - |")
    lines.append(f"| control: held-out half vs held-out half ({control['num_samples']} vs {control['num_reference']}) | "
                 f"{control['fid']:.2f} | {control['precision']:.3f} | {control['recall']:.3f} | - | - |")
    lines.append("")
    lines.append("Precision (recall) is the fraction of samples (real images) inside the k-NN balls (k=3) of the "
                 "other set; 0.000 means none was: at a few hundred tiny images the balls are small, so read each "
                 "row against the control row, not against 1.")
    for label, result in results.items():
        lines.append(f"probe accuracy by step ({label}): "
                     + ", ".join(f"{row['step']}: {row['accuracy']:.2f}" for row in result["probe"]))
    lines.append(f"(FID on {results[next(iter(results))]['metrics']['num_samples']} samples against "
                 f"{results[next(iter(results))]['metrics']['num_reference']} held-out images: a smoke-scale "
                 "number, not comparable with ImageNet FIDs; chance probe accuracy is 0.125)")
    lines.append("")
    for label, result in results.items():
        lines.append(f"{label:>9} : samples {result['grid']}  |  run {result['run']}")
    lines.append(f"    probe : {probe_png}")
    lines.append(f"     time : {seconds:.0f} s total (" + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + ")")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
