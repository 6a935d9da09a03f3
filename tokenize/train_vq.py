"""Train a small VQ tokenizer (LlamaGen's architecture, L2 + codebook losses) on an ImageFolder tree.

    python tokenize/train_vq.py --data IMAGES --out runs/vq --config VQ-tiny --image-size 64 --steps 1000

Writes OUT/vq.pt ({"model": state_dict}, LlamaGen's format), OUT/vq.json (pass it as --vq-config to
tokenize/run.py), OUT/metrics.json (held-out PSNR, codebook usage) and OUT/train_config.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from star.cli import parse_config  # noqa: E402
from star.io import FolderLocked  # noqa: E402
from star.vq.train import VQTrainConfig, format_summary, train_vq  # noqa: E402


def main(argv=None) -> int:
    config = parse_config(VQTrainConfig, argv, description=__doc__)
    try:
        metrics = train_vq(config)
    except (ValueError, FileNotFoundError, FolderLocked) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_summary(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
