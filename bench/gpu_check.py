"""One prepared script of GPU checks, for a session that is lent a GPU (run it once, read the JSON).

    python bench/gpu_check.py --out $OUT/gpu_check.json          # on the GPU machine, about 5-8 minutes
    python bench/gpu_check.py --smoke                            # tiny sizes on CPU: proves the script runs

Checks, at GPT-B scale (12 layers, 768 wide, vocab 16384, 256 tokens, 32 images x 2 views) in bf16 autocast:
- training: LlamaGen's own step (bench/llamagen_ref.py) vs our plain step vs our ST-AR step on the same 64
  sequences, eager and torch.compile'd: time, torch.cuda.max_memory_allocated, ST-AR/plain ratios, and the MFU
  of the plain step (model FLOPs / time / the GPU's dense bf16 peak);
- sampling at batch 8 and 64 with CFG 2.0: our sampler (eager and compiled decode) vs LlamaGen's algorithm,
  images/s;
- VQ-16 encoding throughput (random weights, 256 px, ten views per image) with bf16.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/step_bench.py, bench/llamagen_ref.py


def timed(fn, device, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def peak_memory(fn, device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device)


# Dense bf16 tensor-core peak (FLOP/s) for the MFU figure; other GPUs report MFU as null.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def step_flops(config, sequences: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), PaLM-style: 6 x non-embedding
    parameters x tokens (the LM head included) + causal attention 6 x layers x S^2 x dim (half of 12, causal)."""
    seq = config.block_size  # 1 class + block_size - 1 image positions
    per_layer = (config.dim * (config.n_head + 2 * config.n_kv_head) * config.head_dim + config.dim ** 2
                 + 3 * config.dim * config.ffn_hidden_dim)
    matmul_params = config.n_layer * per_layer + config.dim * config.vocab_size
    return 6.0 * matmul_params * sequences * seq + 6.0 * config.n_layer * seq * seq * config.dim * sequences


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def check_training(device, smoke: bool) -> dict:
    """bf16 ST-AR vs plain vs LlamaGen's step at GPT-B, eager and compiled: time, peak memory, MFU."""
    from step_bench import StepContenders

    spec = ({"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "num_classes": 10, "block_size": 64}
            if smoke else dict(n_layer=12, n_head=12, dim=768))  # GPT-B, vocab 16384, 256 tokens
    images = 4 if smoke else 32
    result = {"images": images, "sequences": 2 * images, "model": "tiny" if smoke else "GPT-B"}
    for compiled in (False, True):
        if compiled and device.type != "cuda":
            continue  # compile on CPU is covered by tests/test_speed_paths.py
        contenders = StepContenders(spec, compile_model=compiled, images=images, device=device)
        steps = {"llamagen": contenders.ref_step, "plain": contenders.plain_step, "star": contenders.star_step}
        tag = "compiled" if compiled else "eager"
        for name, fn in steps.items():
            def bf16_step(fn=fn):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    fn()
            bf16_step()  # warm-up (and compilation)
            bf16_step()
            result[f"{tag}_{name}_s"] = timed(bf16_step, device)
            result[f"{tag}_{name}_peak_bytes"] = peak_memory(bf16_step, device)
            print(f"  {tag} {name}: {result[f'{tag}_{name}_s']:.4f} s, "
                  f"{result[f'{tag}_{name}_peak_bytes'] / 2**30:.2f} GiB", flush=True)  # a cut-off run keeps these
        result[f"{tag}_star_over_plain"] = result[f"{tag}_star_s"] / result[f"{tag}_plain_s"]
        result[f"{tag}_plain_speedup_vs_llamagen"] = result[f"{tag}_llamagen_s"] / result[f"{tag}_plain_s"]
        if result[f"{tag}_plain_peak_bytes"]:
            result[f"{tag}_star_memory_ratio"] = result[f"{tag}_star_peak_bytes"] / result[f"{tag}_plain_peak_bytes"]
        peak = peak_flops(device)
        flops = step_flops(contenders.config, 2 * images)
        result[f"{tag}_plain_mfu"] = flops / result[f"{tag}_plain_s"] / peak if peak else None
        del contenders
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def check_sampling(device, smoke: bool) -> dict:
    """Images/s of our sampler (eager and compiled decode) vs LlamaGen's algorithm, bf16 weights, CFG 2.0."""
    from llamagen_ref import RefTransformer, ref_generate

    from star.gpt.generate import generate
    from star.gpt.model import GPT, GPTConfig

    spec = ({"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "num_classes": 10, "block_size": 64}
            if smoke else {**GPTConfig.resolve("GPT-B").to_dict(), "num_classes": 1000})
    model = GPT(GPTConfig.resolve(spec)).to(device).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    ref = RefTransformer(model.config).to(device).eval()
    ref.load_state_dict(model.state_dict())
    if device.type == "cuda":  # LlamaGen samples with the GPT cast wholesale to bf16
        model, ref = model.to(torch.bfloat16), ref.to(torch.bfloat16)
    result = {}
    for batch in ((4,) if smoke else (8, 64)):
        labels = torch.arange(batch, device=device) % model.config.num_classes

        def ours(compile_decode=False, labels=labels):
            return generate(model, labels, cfg_scale=2.0, generator=torch.Generator(device=device).manual_seed(0),
                            compile_decode=compile_decode)

        def theirs(labels=labels):
            return ref_generate(ref, labels, cfg_scale=2.0, generator=torch.Generator(device=device).manual_seed(0))

        row = {"ours_s": timed(ours, device, 2), "llamagen_s": timed(theirs, device, 2)}
        if device.type == "cuda":
            ours(True)  # compile
            row["ours_compiled_s"] = timed(lambda: ours(True), device, 2)
        row.update({key.replace("_s", "_images_per_s"): batch / value for key, value in list(row.items())})
        row["speedup"] = row["llamagen_s"] / row["ours_s"]
        result[f"batch{batch}"] = row
        print(f"  batch {batch}: {json.dumps(row)}", flush=True)
    return result


def check_tokenizer(device, smoke: bool) -> dict:
    from star.vq.model import VQConfig, VQModel

    config = VQConfig.resolve("VQ-tiny" if smoke else "VQ-16")
    model = VQModel(config).to(device).eval()
    size = 32 if smoke else 256
    views = torch.rand(10 * (2 if smoke else 16), 3, size, size, device=device) * 2 - 1  # 16 images x 10 views

    def encode():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model.encode_indices(views)

    encode()
    seconds = timed(encode, device)
    return {"views": len(views), "seconds": seconds, "images_per_s": len(views) / 10 / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
    parser.add_argument("--out", default="bench/results/gpu_check.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("no GPU here: run with --smoke for a CPU dry run", file=sys.stderr)
        return 2
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    from star.io import write_json_atomic

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name, check in (("training", check_training), ("sampling", check_sampling), ("tokenizer", check_tokenizer)):
        started = time.perf_counter()
        results[name] = check(device, args.smoke)
        results[name]["check_seconds"] = time.perf_counter() - started
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        write_json_atomic(args.out, results)  # after each check: a run cut off keeps the finished ones
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
