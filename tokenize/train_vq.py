"""Train a small VQ tokenizer (LlamaGen's architecture, L2 + codebook losses) on an ImageFolder tree.

    python tokenize/train_vq.py --data IMAGES --out runs/vq --config VQ-tiny --image-size 64 --steps 1000

Writes OUT/vq.pt ({"model": state_dict}, LlamaGen's format), OUT/vq.json (pass it as --vq-config to
tokenize/run.py), OUT/metrics.json (held-out PSNR, codebook usage) and OUT/train_config.json.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from star.vq.train import VQTrainConfig, format_summary, train_vq  # noqa: E402


def parse_args(argv=None) -> VQTrainConfig:
    defaults = VQTrainConfig(data_root="")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ImageFolder tree: root/class/*.png|jpg")
    parser.add_argument("--out", default=defaults.out_dir, help="output folder")
    parser.add_argument("--config", default=defaults.vq_config,
                        help="VQ preset (VQ-tiny, VQ-8, VQ-16) or JSON file of VQConfig fields")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    parser.add_argument("--l1-weight", type=float, default=defaults.l1_weight, help="extra L1 reconstruction term")
    parser.add_argument("--codebook-weight", type=float, default=defaults.codebook_weight)
    parser.add_argument("--dead-code-restart-every", type=int, default=defaults.dead_code_restart_every,
                        help="re-seed codes unused for this many steps (0 = off)")
    parser.add_argument("--holdout-fraction", type=float, default=defaults.holdout_fraction)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return VQTrainConfig(
        data_root=args.data, out_dir=args.out, vq_config=args.config, image_size=args.image_size,
        batch_size=args.batch_size, steps=args.steps, lr=args.lr, l1_weight=args.l1_weight,
        codebook_weight=args.codebook_weight, dead_code_restart_every=args.dead_code_restart_every,
        holdout_fraction=args.holdout_fraction, seed=args.seed, device=args.device,
        num_workers=args.num_workers, progress=not args.no_progress,
    )


def main(argv=None) -> int:
    metrics = train_vq(parse_args(argv))
    print(format_summary(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
