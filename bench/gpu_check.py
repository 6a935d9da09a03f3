"""One prepared script of GPU checks, for a session that is lent a GPU (run it once, read the JSON).

    python bench/gpu_check.py --out $OUT/gpu_check.json          # on the GPU machine, a few minutes
    python bench/gpu_check.py --smoke                            # tiny sizes on CPU: proves the script runs

Checks, at GPT-B scale (12 layers, 768 wide, 256 tokens) in bf16 autocast:
- ST-AR step vs plain step on the same 2 views: time ratio (target <= 1.5) and peak memory ratio from
  torch.cuda.max_memory_allocated (target <= 1.3);
- sampling 32 images with CFG 2.0: our cache (filled part only) vs attending over the whole cache, with and
  without torch.compile of the decode step;
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


def check_training(device, smoke: bool) -> dict:
    from star.gpt.model import GPT, GPTConfig
    from star.train.data import TokenBatch
    from star.train.loop import _forward_losses
    from star.train.objectives import Projector, StarSettings, StudentWithProjector, make_teacher

    spec = ({"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "num_classes": 10, "block_size": 64}
            if smoke else {**GPTConfig.resolve("GPT-B").to_dict(), "num_classes": 1000})
    config = GPTConfig.resolve(spec)
    images = 4 if smoke else 32
    student = GPT(config).to(device)
    wrapped = StudentWithProjector(student, Projector(config.dim, min(2048, 4 * config.dim))).to(device).train()
    plain = StudentWithProjector(student, None).train()
    teacher = make_teacher(student)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4, fused=device.type == "cuda")
    settings = StarSettings(contrastive_layer=config.n_layer // 2)
    tokens = torch.randint(0, config.vocab_size, (images, 2, config.block_size), device=device)
    batch = TokenBatch(tokens, torch.randint(0, config.num_classes, (images,), device=device),
                       torch.arange(config.block_size, device=device).expand(images, 2, -1).contiguous(),
                       torch.arange(images, device=device))

    def step(module, star):
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            terms = _forward_losses(batch, module, teacher, settings, star, config, 0.1, generator)
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(wrapped, True), step(plain, False)
    result = {"images": images, "sequences": 2 * images,
              "star_s": timed(lambda: step(wrapped, True), device), "plain_s": timed(lambda: step(plain, False), device),
              "star_peak_bytes": peak_memory(lambda: step(wrapped, True), device),
              "plain_peak_bytes": peak_memory(lambda: step(plain, False), device)}
    result["time_ratio"] = result["star_s"] / result["plain_s"]
    if result["plain_peak_bytes"]:
        result["memory_ratio"] = result["star_peak_bytes"] / result["plain_peak_bytes"]
    return result


def check_sampling(device, smoke: bool) -> dict:
    from star.gpt.generate import generate
    from star.gpt.model import GPT, GPTConfig

    spec = ({"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "num_classes": 10, "block_size": 64}
            if smoke else {**GPTConfig.resolve("GPT-B").to_dict(), "num_classes": 1000})
    model = GPT(GPTConfig.resolve(spec)).to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    labels = torch.arange(4 if smoke else 32, device=device) % 1000 % model.config.num_classes

    def run(compile_decode=False):
        return generate(model, labels, cfg_scale=2.0, generator=torch.Generator(device=device).manual_seed(0),
                        compile_decode=compile_decode)

    result = {"images": len(labels), "ours_s": timed(run, device, 2)}
    original = type(model).forward_cached

    def full_cache(self, tokens, labels, input_pos, cache_len=None):
        return original(self, tokens, labels, input_pos, cache_len=self._cache_len_capacity or None)

    type(model).forward_cached = full_cache
    try:
        result["full_cache_s"] = timed(run, device, 2)
    finally:
        type(model).forward_cached = original
    if device.type == "cuda":
        run(True)  # compile
        result["compiled_s"] = timed(lambda: run(True), device, 2)
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
    for name, check in (("training", check_training), ("sampling", check_sampling), ("tokenizer", check_tokenizer)):
        results[name] = check(device, args.smoke)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
