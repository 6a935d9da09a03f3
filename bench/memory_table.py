"""Training memory per GPU for each model size, DDP vs FSDP2 (README's table; issue 9, "Scale past one GPU's memory").

    python bench/memory_table.py [--gpus 8] [--images 32] [--views 2]

Weights, gradients, AdamW state and the EMA teacher are exact byte counts (fp32 master weights, as Accelerate
keeps them under bf16 mixed precision). Activations are measured, not modelled: the bytes autograd saves for
backward in one bf16-autocast forward of a real GPT (1 and 2 layers at the preset's width, 1 sequence of 256
positions, on the CPU), split into a per-layer and a fixed (embeddings, head, fp32 logits and loss) part and
scaled to the batch. Weights and their casts are not counted as activations. Attention probabilities are not
saved by the fused SDPA kernels used on GPUs, and are left out here too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from star.gpt.model import GPT, GPTConfig, next_token_loss  # noqa: E402

SIZES = ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B")
TOKENS = 256  # 256 px through a downsample-16 tokenizer: 16 x 16


def parameter_count(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(GPTConfig.resolve(name)).parameters())


def saved_bytes(name: str, n_layer: int) -> int:
    """Bytes autograd saves for backward in one forward + loss of one sequence, bf16 autocast (CPU)."""
    config = GPTConfig.resolve(name)
    config.n_layer = n_layer
    torch.manual_seed(0)
    model = GPT(config)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {shape for p in model.parameters() for shape in (tuple(p.shape), tuple(p.shape)[::-1])}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor):  # autocast's bf16 weight casts (and their transposes) are not activations
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and tuple(tensor.shape) not in weight_shapes:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, config.vocab_size, (1, TOKENS))  # [1, T]: cls + T - 1 inputs = T positions
    labels = torch.zeros(1, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        next_token_loss(model(tokens[:, :-1], labels).logits, tokens, config.cls_token_num)
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8, help="FSDP shards the weights' state over this many GPUs")
    parser.add_argument("--images", type=int, default=32, help="images per GPU")
    parser.add_argument("--views", type=int, default=2, help="views per image (ST-AR: 2)")
    args = parser.parse_args()
    sequences = args.images * args.views
    gib = 2**30
    print(f"| model | params | weights fp32 | grads fp32 | AdamW | EMA teacher | activations, {args.images} images x "
          f"{args.views} views | total DDP | total FSDP x{args.gpus} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in SIZES:
        count = parameter_count(name)
        one, two = saved_bytes(name, 1), saved_bytes(name, 2)
        layers = GPTConfig.resolve(name).n_layer
        activations = sequences * (one + (layers - 1) * (two - one))  # per-GPU batch: FSDP does not shard these
        state = {"weights": 4 * count, "grads": 4 * count, "adamw": 8 * count, "teacher": 4 * count}
        whole = sum(state.values())
        print(f"| {name} | {count / 1e6:.0f} M | {state['weights'] / gib:.1f} | {state['grads'] / gib:.1f} | "
              f"{state['adamw'] / gib:.1f} | {state['teacher'] / gib:.1f} | {activations / gib:.1f} | "
              f"{(whole + activations) / gib:.1f} | {(whole / args.gpus + activations) / gib:.1f} |", flush=True)


if __name__ == "__main__":
    main()
