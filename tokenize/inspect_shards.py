"""Summarise and validate a token-shard folder; optionally decode the first samples' views into a PNG.

    python tokenize/inspect_shards.py shards/NAME
    python tokenize/inspect_shards.py shards/NAME --vq-ckpt vq_ds16_c2i.pt [--vq-config VQ-16] [--preview views.png]

Exit status: 0 healthy, 1 problems found (each printed, naming the shard), 2 bad arguments or no shard folder.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from star.cli import add_config_flags, build_or_exit  # noqa: E402
from star.data.inspect_shards import InspectConfig, inspect  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", metavar="DIR", help="token-shard folder written by tokenize/run.py")
    add_config_flags(parser, InspectConfig)
    config = build_or_exit(parser, InspectConfig, parser.parse_args(argv))
    try:
        return inspect(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
