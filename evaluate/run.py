"""Stage three: sample, score, and look inside.

    python evaluate/run.py sample --ckpt runs/NAME --vq-ckpt vq.pt --cfg-scale 2.0 --num-samples 50000 --out OUT
    python evaluate/run.py fid --samples OUT/samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    python evaluate/run.py probe --ckpt runs/NAME --shards shards/train --eval-shards shards/val --layer 6
    python evaluate/run.py attention --ckpt runs/NAME --shards shards/val --layers 1,6,12 --steps 32,128,256
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def add_model_flags(p):
    p.add_argument("--ckpt", required=True, help="run folder, checkpoint folder, .safetensors, or LlamaGen .pt")
    p.add_argument("--model", default="", help="preset or JSON (needed for official LlamaGen checkpoints)")
    p.add_argument("--weights", default="student", choices=["student", "teacher"])
    p.add_argument("--device", default="auto")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("sample", help="CFG sampling into samples.npz + grid.png")
    add_model_flags(p)
    p.add_argument("--vq-ckpt", default="")
    p.add_argument("--vq-config", default="VQ-16")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"])
    p.add_argument("--cfg-interval", type=int, default=-1)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=50)
    p.add_argument("--classes", default="")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens-only", action="store_true")
    p.add_argument("--save-tokens", default="")
    p.add_argument("--image-size-eval", type=int, default=0, help="bicubic resize for evaluation (384 -> 256)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = commands.add_parser("fid", help="FID / IS / precision / recall")
    p.add_argument("--samples", required=True, help="samples .npz (arr_0) or image folder")
    p.add_argument("--ref", required=True, help="ADM reference .npz, image folder, samples .npz, or shard folder")
    p.add_argument("--inception", default=None, help="Inception weights (TorchScript); found automatically")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "star" / "reference"))
    p.add_argument("--out", default="", help="metrics JSON (default: next to the samples)")

    p = commands.add_parser("probe", help="linear probe accuracy per step (paper Fig. 1b)")
    add_model_flags(p)
    p.add_argument("--shards", required=True, help="training shards for the probe")
    p.add_argument("--eval-shards", required=True, help="held-out shards")
    p.add_argument("--layer", type=int, default=0, help="0: the middle layer")
    p.add_argument("--steps", default="", help="comma list of steps (1-based); default 8 evenly spaced")
    p.add_argument("--view", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="at most this many samples per split")
    p.add_argument("--out", required=True)

    p = commands.add_parser("attention", help="attention maps and class / neighbour mass per layer")
    add_model_flags(p)
    p.add_argument("--shards", required=True)
    p.add_argument("--layers", default="", help="comma list (1-based); default first, middle, last")
    p.add_argument("--steps", default="", help="comma list of query steps; default 4 evenly spaced")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--out", required=True)
    return parser.parse_args(argv)


def pick_device(name: str):
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def even_steps(block_size: int, count: int) -> list[int]:
    return [round(block_size * (i + 1) / count) for i in range(count)]


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def command_sample(args) -> dict:
    from star.eval.sample import SampleConfig, run_sampling

    config = SampleConfig(ckpt=args.ckpt, out=args.out, model=args.model, weights=args.weights, vq_ckpt=args.vq_ckpt,
                          vq_config=args.vq_config, cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule,
                          cfg_interval=args.cfg_interval, top_k=args.top_k, top_p=args.top_p,
                          temperature=args.temperature, num_samples=args.num_samples, classes=args.classes,
                          batch_size=args.batch_size, seed=args.seed, tokens_only=args.tokens_only,
                          save_tokens=args.save_tokens, image_size_eval=args.image_size_eval,
                          precision=args.precision, compile=args.compile, progress=not args.no_progress)
    summary = run_sampling(config)
    if "samples" in summary or "tokens_npz" in summary:
        print(f"{summary['num_samples']} samples in {summary['seconds']} s -> "
              + ", ".join(f"{k}: {v}" for k, v in summary.items() if k in ("samples", "grid", "tokens", "tokens_npz")))
    return summary


def resolve_reference(ref: str) -> str:
    """A shard folder stands for the source images behind it (folder inputs)."""
    manifest_path = Path(ref) / "manifest.json"
    if manifest_path.is_file():
        source = json.loads(manifest_path.read_text())["source"]
        if source["kind"] != "folder":
            raise ValueError(f"--ref {ref}: shards made from tars; give the image folder or an .npz instead")
        return source["data"]
    return ref


def command_fid(args) -> dict:
    from star.eval.metrics import compute_metrics, format_report
    from star.io import write_json_atomic

    metrics = compute_metrics(args.samples, resolve_reference(args.ref), inception_path=args.inception,
                              batch_size=args.batch_size, device=pick_device(args.device), cache_dir=args.cache_dir)
    print(format_report(metrics))
    out = Path(args.out) if args.out else Path(args.samples).with_name("metrics.json")
    if Path(args.samples).is_dir() and not args.out:
        out = Path(args.samples) / "metrics.json"
    write_json_atomic(out, metrics)
    print(f"metrics written to {out}")
    return metrics


def command_probe(args) -> dict:
    from star.eval.sample import load_generator
    from star.eval.understanding import plot_curves, probe, shard_tokens
    from star.io import write_json_atomic

    model = load_generator(args.ckpt, args.model, args.weights).to(pick_device(args.device))
    layer = args.layer or model.config.n_layer // 2
    steps = parse_ints(args.steps) or even_steps(model.config.block_size, 8)
    train_x, train_y = shard_tokens(args.shards, args.view, args.limit)
    test_x, test_y = shard_tokens(args.eval_shards, args.view, args.limit)
    rows = probe(model, train_x, train_y, test_x, test_y, layer, steps)
    out = Path(args.out)
    result = {"layer": layer, "rows": rows, "train_samples": len(train_y), "eval_samples": len(test_y),
              "chance": 1.0 / max(1, len(set(train_y.tolist())))}
    write_json_atomic(out / "probe.json", result)
    plot_curves({f"layer {layer}": rows}, out / "probe.png")
    print(f"linear probe, layer {layer} ({len(train_y)} train / {len(test_y)} held-out, chance {result['chance']:.3f})")
    print("  step  accuracy")
    for row in rows:
        print(f"  {row['step']:>4}  {row['accuracy']:.3f}")
    print(f"written: {out / 'probe.json'}, {out / 'probe.png'}")
    return result


def command_attention(args) -> dict:
    from star.eval.sample import load_generator
    from star.eval.understanding import attention_maps, attention_statistics, save_attention_png, shard_tokens
    from star.io import write_json_atomic

    model = load_generator(args.ckpt, args.model, args.weights).to(pick_device(args.device))
    n_layer, block = model.config.n_layer, model.config.block_size
    layers = parse_ints(args.layers) or sorted({1, max(1, n_layer // 2), n_layer})
    steps = parse_ints(args.steps) or even_steps(block, 4)
    tokens, labels = shard_tokens(args.shards, 0, args.samples)
    weights = attention_maps(model, tokens, labels, layers)
    grid = model.config.grid_size
    stats = {layer: attention_statistics(weights[layer], grid) for layer in layers}
    out = Path(args.out)
    png = save_attention_png(weights, steps, grid, out / "attention.png")
    write_json_atomic(out / "attention.json", {"layers": {str(k): v for k, v in stats.items()}, "steps": steps})
    print("layer  mass on class  mass on 8 neighbours")
    for layer, row in stats.items():
        print(f"{layer:>5}  {row['class_mass']:>13.3f}  {row['neighbour_mass']:>20.3f}")
    print(f"written: {png}, {out / 'attention.json'}")
    return stats


def main(argv=None) -> int:
    args = parse_args(argv)
    handler = {"sample": command_sample, "fid": command_fid, "probe": command_probe, "attention": command_attention}
    try:
        handler[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
