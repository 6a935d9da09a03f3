"""The memory table of docs/memory.md: per model size, what one GPU holds when training at 256 px.

    python bench/memory_table.py            # measures two small models on CPU (~1 min), prints the markdown

Static memory is counted exactly from the configs: fp32 parameters, fp32 gradients, AdamW's two fp32 moments,
the fp32 EMA teacher (ST-AR only) and the student-only projector (ST-AR only). Activations are MEASURED, not
guessed: the bytes of the distinct tensors autograd saves for backward in one bf16-autocast step (as
Accelerate's mixed_precision="bf16" runs it), at two small depths, so that

    activation_bytes(L, D, N) = N * (L * a * D + b * D) + head_bytes(V, D)

with N = tokens in the step, a = saved bytes per token per layer per model dimension (the slope between the
two depths), b = the per-token rest (embeddings, final norm, the chunked head's saved input gradient), and
head_bytes = the chunked head's saved weight gradient (V x D float32, independent of N). Every per-layer
tensor saved for backward is token x (a multiple of D) (q, k, v, attention output, the SwiGLU hidden of
8/3 D, norms), and flash attention saves no S x S matrix, so a is the same at every size: the formula
extrapolates to GPT-3B. ST-AR adds the teacher's two kept state tensors (final and contrastive layer) and
the projector's activations at K positions; both are measured in the same way.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B")
TOKENS, IMAGES, VIEWS, GPUS = 256, 32, 2, 8


def measure(dim: int, n_layer: int, self_guided: bool, images: int = 2) -> tuple[int, int]:
    """(saved bytes, tokens) of one bf16-autocast step at a small size; the step's weights are not counted."""
    from step_bench import StepContenders

    spec = {"dim": dim, "n_layer": n_layer, "n_head": dim // 64, "vocab_size": 16384, "num_classes": 1000}
    contenders = StepContenders(spec, images=images)
    step = contenders.star_step if self_guided else contenders.plain_step
    parameters = {p.untyped_storage().data_ptr() for p in contenders.star_module.parameters()}
    weight_shapes = {tuple(p.shape) for p in contenders.star_module.parameters() if p.dim() == 2}

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step()

    seen: dict[int, int] = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        # neither the weights nor autocast's bf16 copies of them (2 bytes per parameter, counted as static)
        weight_copy = tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in weight_shapes
        if pointer not in parameters and not weight_copy:
            seen[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values()), 2 * images * TOKENS


def fit(self_guided: bool) -> dict:
    """a, b, head term of the activation formula from two depths at dim 128."""
    dim, vocab = 128, 16384
    shallow, tokens = measure(dim, 2, self_guided)
    deep, _ = measure(dim, 4, self_guided)
    per_layer = (deep - shallow) / 2 / tokens / dim  # a
    head = vocab * dim * 4  # the chunked head's saved float32 weight gradient
    rest = (shallow - 2 * per_layer * tokens * dim - head) / tokens / dim  # b
    return {"a": per_layer, "b": rest, "dim": dim, "measured_2_layers": shallow, "measured_4_layers": deep}


def model_numbers(name: str) -> dict:
    from star.gpt.model import GPT, GPTConfig, count_parameters

    config = GPTConfig.resolve(name)
    with torch.device("meta"):
        params = count_parameters(GPT(config))
    hidden = min(2048, 4 * config.dim)
    projector = config.dim * hidden + hidden * hidden + hidden * config.dim + 2 * hidden + 4 * hidden + config.dim
    return {"config": config, "params": params, "projector": projector}


def activation_bytes(fitted: dict, config, tokens: int) -> float:
    return tokens * config.dim * (config.n_layer * fitted["a"] + fitted["b"]) + config.vocab_size * config.dim * 4


def table() -> str:
    plain_fit, star_fit = fit(False), fit(True)
    gib = 2**30
    lines = [
        f"Measured on CPU in bf16 autocast at dim 128: plain a = {plain_fit['a']:.1f}, b = {plain_fit['b']:.1f}; "
        f"ST-AR a = {star_fit['a']:.1f}, b = {star_fit['b']:.1f} (bytes per token per layer per dim, and per "
        "token per dim).",
        "",
        "| model | params | weights fp32 | grads fp32 | AdamW fp32 | teacher fp32 | activations plain / 32 img |"
        " activations ST-AR / 32 img x 2 views | DDP per GPU plain / ST-AR | FSDP x8 per GPU plain / ST-AR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SIZES:
        numbers = model_numbers(name)
        config, params, projector = numbers["config"], numbers["params"], numbers["projector"]
        weights, grads, adam, teacher = 4 * params, 4 * params, 8 * params, 4 * params
        star_trainable = params + projector
        plain_act = activation_bytes(plain_fit, config, IMAGES * TOKENS)
        star_act = activation_bytes(star_fit, config, IMAGES * VIEWS * TOKENS)
        casts = 2 * params  # autocast's bf16 weight copies, kept for the step's backward (DDP)
        ddp_plain = weights + grads + adam + casts + plain_act
        ddp_star = 16 * star_trainable + teacher + casts + star_act
        fsdp_plain = (weights + grads + adam) / GPUS + plain_act
        fsdp_star = (16 * star_trainable + teacher) / GPUS + star_act
        lines.append(
            f"| {name} | {params / 1e6:.0f} M | {weights / gib:.2f} | {grads / gib:.2f} | {adam / gib:.2f} | "
            f"{teacher / gib:.2f} | {plain_act / gib:.1f} | {star_act / gib:.1f} | "
            f"{ddp_plain / gib:.1f} / {ddp_star / gib:.1f} | {fsdp_plain / gib:.1f} / {fsdp_star / gib:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(table())
