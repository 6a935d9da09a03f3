"""Train a small VQ tokenizer (LlamaGen's architecture; L2 + codebook losses, optional PatchGAN) on an ImageFolder.

    python tokenize/train_vq.py --data IMAGES --out runs/vq --config VQ-tiny --image-size 64 --steps 1000
    python tokenize/train_vq.py ... --resume auto      # continue from the newest checkpoint in --out
    python tokenize/train_vq.py ... --disc-weight 0.5 --disc-start 20000   # LlamaGen's PatchGAN term (off by default)

Writes OUT/vq.pt ({"model": state_dict}, LlamaGen's format), OUT/vq.json (pass it as --vq-config to
tokenize/run.py), OUT/metrics.json (held-out PSNR, codebook usage), OUT/train_config.json and
OUT/checkpoints/step-NNNNNNN/. Ctrl-C or SIGTERM stops at the next step boundary after writing a checkpoint.
LPIPS (LlamaGen's perceptual term) needs downloaded VGG weights and is not shipped.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from star.checkpoint_folder import CheckpointWriteError  # noqa: E402
from star.cli import parse_config, run_command  # noqa: E402
from star.lock import FolderLocked  # noqa: E402
from star.signals import StopRequested  # noqa: E402
from star.vq.train import VQTrainConfig, format_summary, train_vq  # noqa: E402


def main(argv=None) -> int:
    config = parse_config(VQTrainConfig, argv, description=__doc__)
    try:
        return run_command(train_vq, config, format_summary, user_errors=(FolderLocked, CheckpointWriteError))
    except StopRequested as stop:  # SIGINT / SIGTERM: a checkpoint was written at the step boundary
        print(stop, file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
