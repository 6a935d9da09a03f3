"""Stage two: train a LlamaGen GPT on token shards, with ST-AR's self-guided losses (default) or without.

    python train/run.py --shards shards/NAME --model GPT-B --out runs/NAME --epochs 50
    accelerate launch train/run.py ...          # DDP / FSDP / multi-node from Accelerate's config
    python train/run.py ... --no-star           # the plain LlamaGen baseline
    python train/run.py ... --resume auto       # continue from the newest checkpoint in --out
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from star.train.loop import NonFiniteLoss, TrainConfig, train  # noqa: E402
from star.train.objectives import StarSettings  # noqa: E402


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="token-shard folder written by tokenize/run.py")
    p.add_argument("--out", required=True, help="run folder: config, log.jsonl, checkpoints/")
    p.add_argument("--model", default="GPT-B", help="GPT-B/L/XL/XXL/XXXL/3B or a JSON file of LlamaGen ModelArgs")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--epochs", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=256, help="global batch, in images")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 per 256 images")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--token-dropout", type=float, default=None)
    p.add_argument("--dropout", type=float, default=None, help="residual and FFN dropout (LlamaGen: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-star", action="store_true", help="plain LlamaGen next-token training")
    p.add_argument("--views", type=int, default=2, help="M views per image for ST-AR")
    p.add_argument("--view-match", default="index", choices=["index", "geometry"])
    p.add_argument("--mask-ratio", type=float, default=0.25)
    p.add_argument("--contrastive-layer", type=int, default=0, help="0: the middle layer")
    p.add_argument("--num-positions", type=int, default=4, help="K positions per sequence")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--teacher-decay", type=float, default=0.9999)
    p.add_argument("--mim-weight", type=float, default=1.0)
    p.add_argument("--contrastive-weight", type=float, default=0.5)
    p.add_argument("--no-mim", action="store_true")
    p.add_argument("--no-step", action="store_true")
    p.add_argument("--no-view", action="store_true")
    p.add_argument("--projector-hidden", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=5000)
    p.add_argument("--keep-checkpoints", type=int, default=3)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", default="", help="'auto' (newest in --out) or a checkpoint folder")
    p.add_argument("--init-from", default="", help="LlamaGen .pt or our checkpoint folder, to fine-tune")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--loader", default="map", choices=["map", "stream"],
                   help="map: memory-mapped token cache, exact resume (default); stream: WebDataset, resampled")
    p.add_argument("--cache-dir", default="", help="where the token cache goes (default: <shards>/cache)")
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    settings = StarSettings(mim_weight=a.mim_weight, contrastive_weight=a.contrastive_weight, mask_ratio=a.mask_ratio,
                            contrastive_layer=a.contrastive_layer, num_positions=a.num_positions,
                            temperature=a.temperature, teacher_decay=a.teacher_decay, use_mim=not a.no_mim,
                            use_step=not a.no_step, use_view=not a.no_view)
    return TrainConfig(shards=a.shards, out=a.out, model=a.model, steps=a.steps, epochs=a.epochs,
                       batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr, weight_decay=a.weight_decay,
                       grad_clip=a.grad_clip, class_dropout=a.class_dropout, token_dropout=a.token_dropout,
                       dropout=a.dropout, seed=a.seed, star=not a.no_star, views=a.views, view_match=a.view_match,
                       star_settings=settings, projector_hidden=a.projector_hidden, ckpt_every=a.ckpt_every,
                       keep_checkpoints=a.keep_checkpoints, log_every=a.log_every, resume=a.resume,
                       init_from=a.init_from, deterministic=a.deterministic, compile=a.compile, workers=a.workers,
                       loader=a.loader, cache_dir=a.cache_dir, tensorboard=a.tensorboard, mixed_precision=a.mixed_precision,
                       progress=not a.no_progress)


def main(argv=None) -> int:
    config = parse_args(argv)
    try:
        summary = train(config)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if summary["rank"] == 0:
        print(f"\ntrained {summary['steps']} steps in {summary['seconds']} s; last checkpoint: {summary['last_checkpoint']}"
              f"\nlog: {Path(summary['out']) / 'log.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
