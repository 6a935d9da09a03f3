"""Stage one: tokenize images into WebDataset token shards.

    python tokenize/run.py --data IMAGES --out shards/NAME --vq-ckpt vq_ds16_c2i.pt --vq-config VQ-16
    accelerate launch tokenize/run.py ...      # N processes, each writes its own shards
    python tokenize/inspect_shards.py shards/NAME [--vq-ckpt ...]     # summarise, validate, preview
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from star.cli import parse_config, run_command  # noqa: E402
from star.data.extract import TokenizeConfig, format_summary, run_tokenize  # noqa: E402
from star.lock import FolderLocked  # noqa: E402


def main(argv=None) -> int:
    config = parse_config(TokenizeConfig, argv, description=__doc__)
    return run_command(run_tokenize, config, lambda summary: format_summary(summary) if "out" in summary else "",
                       user_errors=(FolderLocked,))


if __name__ == "__main__":
    sys.exit(main())
