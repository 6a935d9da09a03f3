"""Stage one: tokenize images into WebDataset token shards.

    python tokenize/run.py --data IMAGES --out shards/NAME --vq-ckpt vq_ds16_c2i.pt --vq-config VQ-16
    accelerate launch tokenize/run.py ...      # N processes, each writes its own shards
    python tokenize/run.py --inspect shards/NAME [--vq-ckpt ...]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from star.data.extract import TokenizeConfig, format_summary, run_tokenize  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="ImageFolder tree (class/*.jpg) or WebDataset tars of images with `cls`")
    parser.add_argument("--out", help="output shard folder")
    parser.add_argument("--vq-ckpt", help="VQ checkpoint (official LlamaGen format: {'model': state_dict})")
    parser.add_argument("--vq-config", default="VQ-16", help="VQ preset (VQ-16, VQ-8) or JSON file")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--views", default="tencrop", help="tencrop | random:N | center")
    parser.add_argument("--crop-range", type=float, default=1.1, help="ADM centre-crop frame = crop_range x size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (folder inputs)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per encoder batch")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers for decoding and cropping")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--inspect", metavar="DIR", help="summarise and validate a shard folder instead")
    parser.add_argument("--preview", default=None, help="with --inspect: PNG path for decoded views")
    return parser.parse_args(argv)


def inspect(args) -> int:
    from star.data.inspect_shards import decode_preview, describe_manifest, validate_shards
    from star.data.shards import Manifest

    print(describe_manifest(Manifest.load(args.inspect)))
    report = validate_shards(args.inspect)
    print(f"validated      : {report['samples']} samples in {report['shards']} shards, {len(report['problems'])} problems")
    for problem in report["problems"][:20]:
        print(f"   ! {problem}")
    if args.vq_ckpt:
        png = decode_preview(args.inspect, args.vq_ckpt, args.vq_config if args.vq_config != "VQ-16" else None,
                             args.preview or Path(args.inspect) / "preview.png")
        print(f"preview        : {png} (a row per sample, a column per view)")
    return 1 if report["problems"] else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.inspect:
        return inspect(args)
    missing = [flag for flag, value in (("--data", args.data), ("--out", args.out), ("--vq-ckpt", args.vq_ckpt)) if not value]
    if missing:
        print(f"error: {', '.join(missing)} required (see --help)", file=sys.stderr)
        return 2
    config = TokenizeConfig(data=args.data, out=args.out, vq_ckpt=args.vq_ckpt, vq_config=args.vq_config,
                            image_size=args.image_size, views=args.views, crop_range=args.crop_range, seed=args.seed,
                            shard_size=args.shard_size, batch_size=args.batch_size, workers=args.workers,
                            device=args.device, precision=args.precision, progress=not args.no_progress)
    try:
        summary = run_tokenize(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "out" in summary:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
