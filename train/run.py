"""Stage two: train a LlamaGen GPT on token shards, with ST-AR's self-guided losses (default) or without.

    python train/run.py --shards shards/NAME --model GPT-B --out runs/NAME --epochs 50
    accelerate launch train/run.py ...          # DDP / FSDP / multi-node from Accelerate's config
    python train/run.py ... --no-star           # the plain LlamaGen baseline
    python train/run.py ... --resume auto       # continue from the newest intact checkpoint in --out
    python train/run.py --shards shards/NAME --prepare-only   # build the token cache before a launch
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from star.checkpoint_folder import CheckpointWriteError  # noqa: E402
from star.cli import parse_config, run_command  # noqa: E402
from star.lock import FolderLocked  # noqa: E402
from star.train.loop import NonFiniteLoss, StopRequested, TrainConfig, prepare_token_cache, train  # noqa: E402
from star.train.run_folder import NonFiniteWeights  # noqa: E402


def main(argv=None) -> int:
    config = parse_config(TrainConfig, argv, __doc__)  # a bad value exits 2 with one line
    try:
        if config.prepare_only:
            return run_command(prepare_token_cache, config, summarise_prepared)
        return run_command(train, config, summarise,
                           user_errors=(FolderLocked, NonFiniteLoss, NonFiniteWeights, CheckpointWriteError))
    except StopRequested as stop:  # SIGTERM / SIGINT: a checkpoint was written at the step boundary
        if not stop.quiet:  # the main process says it once for the launch
            print(stop, file=sys.stderr)
        return stop.exit_code


def summarise_prepared(prepared: dict) -> str:
    if prepared["rank"] != 0:
        return ""
    return f"shards checked ({prepared['shards']} shards, {prepared['samples']} samples); token cache: {prepared['cache']}"


def summarise(summary: dict) -> str:
    if summary.get("rank", 0) != 0:
        return ""
    done, start = summary["steps"], summary.get("start_step", 0)
    steps = f"steps {start + 1}-{done}" if summary["trained_steps"] else "no step left to train"
    resumed = f", resumed from step {start}" if summary.get("resumed_from") else ""
    return (f"\ntrained {summary['trained_steps']} steps in {summary['seconds']} s ({steps}{resumed}; the run is at "
            f"step {done} of {summary['total_steps']}); last checkpoint: {summary['last_checkpoint']}\n"
            f"log: {Path(summary['out']) / 'log.jsonl'}")


if __name__ == "__main__":
    sys.exit(main())
