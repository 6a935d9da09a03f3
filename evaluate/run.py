"""Stage three: sample, score, and look inside. Argument handling only: the work is in star/eval.

    python evaluate/run.py sample --ckpt runs/NAME --vq-ckpt vq.pt --cfg-scale 2.0 --num-samples 50000 --out OUT
    python evaluate/run.py fid --samples OUT/samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    python evaluate/run.py probe --ckpt runs/NAME --shards shards/train --eval-shards shards/val --layer 6
    python evaluate/run.py attention --ckpt runs/NAME --shards shards/val --layers 1,6,12 --positions 32,128,256
    python evaluate/run.py nll --ckpt runs/NAME --shards shards/val --out nll.json
    python evaluate/run.py plot runs/baseline runs/star --out curves.png

Every flag comes from a settings dataclass (star/eval/sample.py SampleConfig, star/eval/metrics.py FidConfig,
star/eval/understanding.py ProbeConfig / AttentionConfig, star/eval/nll.py NllConfig, star/eval/curves.py
PlotConfig, whose run folders are the positional RUN arguments); a bad value exits with status 2 and one line.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from star.cli import CommandParser, add_config_flags, build_or_exit, run_command  # noqa: E402


def commands() -> dict:
    """name -> (help, settings class, run function, summary formatter)."""
    from star.eval.curves import PlotConfig, format_plot, run_plot
    from star.eval.metrics import FidConfig, format_report, run_fid
    from star.eval.nll import NllConfig, format_nll, run_nll
    from star.eval.sample import SampleConfig, format_sampling_summary, run_sampling
    from star.eval.understanding import (
        AttentionConfig,
        ProbeConfig,
        format_attention,
        format_probe,
        run_attention,
        run_probe,
    )

    return {
        "sample": ("CFG sampling into samples.npz + grid.png", SampleConfig, run_sampling, format_sampling_summary),
        "fid": ("FID / KID / sFID / IS / precision / recall", FidConfig, run_fid, format_report),
        "probe": ("linear probe accuracy per position (paper Fig. 1b)", ProbeConfig, run_probe, format_probe),
        "attention": ("attention maps and class / neighbour mass per layer", AttentionConfig, run_attention,
                      format_attention),
        "nll": ("held-out next-token NLL with and without the label", NllConfig, run_nll, format_nll),
        "plot": ("training curves of one or more runs from their log.jsonl (losses, grad norm, images/s against "
                 "step and compute)", PlotConfig, run_plot, format_plot),
    }


# Settings given as positional arguments: command -> (field, metavar, help); the field has cli=False.
POSITIONAL = {"plot": ("runs", "RUN", "training run folders (each with log.jsonl); several are overlaid")}


def main(argv=None) -> int:
    table = commands()
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, settings_class, _, _) in table.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name in POSITIONAL:
            field, metavar, positional_help = POSITIONAL[name]
            subparser.add_argument(field, nargs="+", metavar=metavar, help=positional_help)
        add_config_flags(subparser, settings_class)
    namespace = parser.parse_args(argv)
    _, settings_class, run, summarise = table[namespace.command]
    config = build_or_exit(subparsers.choices[namespace.command], settings_class, namespace)
    return run_command(run, config, summarise, user_errors=(KeyError,))


if __name__ == "__main__":
    sys.exit(main())
