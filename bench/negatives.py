"""What `--negatives global` costs over `local`: the InfoNCE terms (L_step + L_view, forward and backward) of one
process's 32 images scored against its own 32 (local) or against a global batch of 256 (8 processes), at GPT-B's
width, next to the all_gather and the accumulation pre-pass they need (sizes, from the shapes).

    PYTHONPATH=. python bench/negatives.py [--rounds 20]

Prints one JSON object; ratios, not a timed test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from star.train.objectives import NegativePool, step_loss, view_loss

ROWS, GLOBAL, VIEWS, POSITIONS, DIM, SEQ = 32, 256, 2, 4, 768, 256  # GPT-B, 32 images a GPU, 8 GPUs


def contrastive_seconds(pool_rows: int, rounds: int) -> float:
    """Median seconds of L_step + L_view forward and backward for ROWS student rows against `pool_rows`."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(ROWS, VIEWS, POSITIONS, DIM, generator=generator, requires_grad=True)
    pool = NegativePool(torch.arange(pool_rows), here=torch.randn(pool_rows, VIEWS, POSITIONS, DIM, generator=generator),
                        other=torch.randn(pool_rows, VIEWS, POSITIONS, DIM, generator=generator),
                        valid=torch.ones(pool_rows, VIEWS, POSITIONS, dtype=torch.bool))
    times = []
    for _ in range(rounds + 2):
        start = time.perf_counter()
        (step_loss(student, pool, 0.2) + view_loss(student, pool, 0.2)).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    local, global_ = contrastive_seconds(ROWS, args.rounds), contrastive_seconds(GLOBAL, args.rounds)
    gpt_b_forward_flops = 2 * 111e6 * ROWS * VIEWS * SEQ  # per process and micro-batch: 2 x params x tokens
    logits_flops = 2 * VIEWS * POSITIONS * POSITIONS * ROWS * GLOBAL * DIM * 2  # L_step (all pairs) + L_view, fwd
    print(json.dumps({
        "contrastive_terms_ms_local_32": round(local * 1e3, 3),
        "contrastive_terms_ms_global_256": round(global_ * 1e3, 3),
        "global_over_local": round(global_ / local, 2),
        "global_logit_flops_over_gpt_b_forward": f"{logits_flops / gpt_b_forward_flops:.1e}",
        # here + other, fp32, this process's rows: what each process sends to the all_gather per step
        "all_gather_mb_sent_per_process": round(2 * ROWS * VIEWS * POSITIONS * DIM * 4 / 2**20, 2),
        "ddp_gradient_allreduce_mb_gpt_b_bf16": round(111e6 * 2 / 2**20),
        # the teacher's final states kept per extra micro-batch with --grad-accum (bf16)
        "prepass_mb_per_micro_batch_bf16": round(ROWS * VIEWS * SEQ * DIM * 2 / 2**20, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
