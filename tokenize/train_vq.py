"""Train a small VQ tokenizer (LlamaGen's architecture, L2 + codebook losses) on an ImageFolder tree.

    python tokenize/train_vq.py --data IMAGES --out runs/vq --config VQ-tiny --image-size 64 --steps 1000

Writes OUT/vq.pt ({"model": state_dict}, LlamaGen's format), OUT/vq.json (pass it as --vq-config to
tokenize/run.py), OUT/metrics.json (held-out PSNR, codebook usage) and OUT/train_config.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from star.cli import parse_config, run_command  # noqa: E402
from star.lock import FolderLocked  # noqa: E402
from star.vq.train import VQTrainConfig, format_summary, train_vq  # noqa: E402


def main(argv=None) -> int:
    config = parse_config(VQTrainConfig, argv, description=__doc__)
    return run_command(train_vq, config, format_summary, user_errors=(FolderLocked,))


if __name__ == "__main__":
    sys.exit(main())
