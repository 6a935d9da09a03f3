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
from star.io import FolderLocked  # noqa: E402

# Flags of earlier versions: a one-line pointer to the new name instead of argparse's "unrecognized arguments".
RENAMED_FLAGS = {"--views": "--view-policy", "--workers": "--num-workers",
                 "--inspect": "its own command: python tokenize/inspect_shards.py DIR"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    for old in (arg.split("=", 1)[0] for arg in argv):
        if old in RENAMED_FLAGS:
            print(f"error: {old} was renamed; use {RENAMED_FLAGS[old]}", file=sys.stderr)
            return 2
    config = parse_config(TokenizeConfig, argv, description=__doc__)
    return run_command(run_tokenize, config, lambda summary: format_summary(summary) if "out" in summary else "",
                       user_errors=(FolderLocked,))


if __name__ == "__main__":
    sys.exit(main())
