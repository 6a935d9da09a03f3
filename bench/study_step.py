"""The study's own training step (dim 128, 4 layers, 8x8 tokens, 64 images a step), through the real trainer:
today's way (fp32, eager, one process on every core) against the study's fast way (bf16 autocast with fp32
attention, compiled, one thread a process, two seeds trained at once). Each contender trains `steps` steps
of the plain and the ST-AR step on synthetic shards of the study's layout; the figure is the steady-state
seconds per step from the trainer's own log (its clock, the first `warmup` steps left out), per run for
the study: a pair of runs side by side counts half its step time. Rounds alternate the contenders.

    python bench/study_step.py --steps 60 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from star.study.presets import GPT_SMALL  # noqa: E402

CONTENDERS = {
    "today": {"flags": ["--precision", "fp32"], "threads": os.cpu_count() or 1, "parallel": 1},
    "fast": {"flags": ["--precision", "bf16", "--compile"], "threads": 1, "parallel": 2},
}


def write_study_shards(folder: Path) -> Path:
    from star.data.synthetic import SyntheticLayout, write_synthetic_shards

    write_synthetic_shards(folder, SyntheticLayout(2000, num_classes=10, grid=8, codebook_size=512, image_size=32))
    return folder


def _train_argv(shards: Path, model: Path, out: Path, steps: int, self_guided: bool, seed: int,
                flags: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "train/run.py"), "--shards", str(shards), "--model", str(model), "--out",
            str(out), "--steps", str(steps), "--batch-size", "64", "--lr", "1e-3", "--seed", str(seed),
            "--num-workers", "0", "--log-every", "5", "--ckpt-every", str(steps), "--no-progress",
            *([] if self_guided else ["--no-star"]), *flags]


def seconds_per_step(log: Path, warmup: int) -> float:
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steady = [r for r in records if r["step"] >= warmup]
    return (steady[-1]["time"] - steady[0]["time"]) / (steady[-1]["step"] - steady[0]["step"])


def time_contender(name: str, shards: Path, model: Path, work: Path, steps: int, self_guided: bool,
                   warmup: int) -> dict:
    """One round of a contender: its runs side by side; returns per-run seconds per step for the study."""
    spec = CONTENDERS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    outs = [work / f"{name}-{'star' if self_guided else 'plain'}-{seed}-{os.urandom(4).hex()}" for seed in
            range(spec["parallel"])]
    procs = [subprocess.Popen(_train_argv(shards, model, out, steps, self_guided, seed, spec["flags"]), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed, out in enumerate(outs)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{name} trainer failed: {err[-2000:]}")
    per_run = [seconds_per_step(out / "log.jsonl", warmup) for out in outs]
    return {"seconds_per_step_each": per_run, "study_seconds_per_step": statistics.mean(per_run) / len(per_run)}


def bench_study_step(steps: int = 60, rounds: int = 2, warmup: int = 15) -> dict:
    """{plain|star: {contender: median study s/step over rounds, ..., "speedup": today / fast}}."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = write_study_shards(work / "shards")
        model = work / "gpt.json"
        model.write_text(json.dumps({**GPT_SMALL, "vocab_size": 512}))
        for self_guided in (False, True):
            rounds_of = {name: [] for name in CONTENDERS}
            for _ in range(rounds):
                for name in CONTENDERS:
                    rounds_of[name].append(time_contender(name, shards, model, work, steps, self_guided, warmup))
            kind = "star" if self_guided else "plain"
            medians = {name: statistics.median(r["study_seconds_per_step"] for r in runs)
                       for name, runs in rounds_of.items()}
            results[kind] = {"study_seconds_per_step": medians, "rounds": rounds_of,
                             "speedup": medians["today"] / medians["fast"],
                             "contenders": {name: {k: v for k, v in spec.items()} for name, spec in CONTENDERS.items()}}
    results["settings"] = {"steps": steps, "warmup": warmup, "rounds": rounds, "batch_images": 64,
                           "model": GPT_SMALL, "target": "speedup >= 2"}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    result = bench_study_step(args.steps, args.rounds)
    for kind in ("plain", "star"):
        r = result[kind]
        print(f"{kind}: today {r['study_seconds_per_step']['today']:.3f} s/step, fast "
              f"{r['study_seconds_per_step']['fast']:.3f} s/step per run -> {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
