"""Training-step and sampling benchmarks against the faithful LlamaGen baseline (bench/llamagen_ref.py).

Every comparison runs its contenders interleaved, round after round, in one process, and reports the MEDIAN
(and the minimum) per contender: the machines here are shared, and interleaving spreads a noisy spell over all
contenders alike instead of charging it to whichever ran at that moment.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

import torch
from llamagen_ref import RefTransformer, ref_generate

# A compute-bound CPU size (the LM head and the layers both matter), and a larger one so the growth of the costs shows.
STEP_SIZES = {
    "d384-L6": {"dim": 384, "n_layer": 6, "n_head": 6},
    "d512-L8": {"dim": 512, "n_layer": 8, "n_head": 8},
}
VOCAB, CLASSES, BLOCK = 16384, 1000, 256


def ratio_clock() -> str:
    """The timing the ratios use at the current torch thread count (see `interleaved`)."""
    return "cpu_median_s" if torch.get_num_threads() == 1 else "median_s"


def interleaved(contenders: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, dict]:
    """{name: {"median_s", "cpu_median_s", "cpu_min_s", "runs"}}: each round runs every contender once, in turn.

    With one compute thread the ratios use the process CPU time (`cpu_median_s`): the work a step does, which
    barely moves when other jobs share the cores, while the wall time (`median_s`, also reported) swings with
    their load. With several threads they use the wall time (CPU time would count threads waiting on each
    other): run those on an idle machine. `ratio_clock` picks the key.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return {name: {"median_s": statistics.median(wall[name]), "cpu_median_s": statistics.median(cpu[name]),
                   "cpu_min_s": min(cpu[name]), "runs": rounds} for name in contenders}


def _token_batch(config, images: int, views: int, device, seed: int = 0):
    from star.train.token_loader import TokenBatch

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (images, views, config.block_size), generator=generator)
    labels = torch.randint(0, config.num_classes, (images,), generator=generator)
    match = torch.arange(config.block_size).expand(images, views, -1).clone()  # index matching, as --view-match index
    return TokenBatch(tokens, labels, match, torch.arange(images)).to(device)


class StepContenders:
    """The three steps compared at one model size, sharing one set of weights where that is fair.

    ref: LlamaGen's computation (its model structure, full logits + F.cross_entropy, foreach AdamW as LlamaGen
    gets on CPU, clip 1.0) on 8 sequences. plain: our trainer's step (`batch_losses` + backward + clip +
    its optimiser) on the same 8 sequences. star: the ST-AR step on 4 images x 2 views = the same 8 sequences.
    """

    def __init__(self, spec: dict, compile_model: bool = False, images: int = 4, device="cpu"):
        from star.gpt.model import GPT, GPTConfig
        from star.train.loop import parameter_groups
        from star.train.objectives import Projector, StudentWithProjector, make_teacher
        from star.train.star_settings import StarSettings

        self.device = torch.device(device)
        self.config = GPTConfig.resolve({"vocab_size": VOCAB, "num_classes": CLASSES, "block_size": BLOCK, **spec})
        torch.manual_seed(0)
        self.ref = RefTransformer(self.config).to(self.device).train()
        self.ref_optimizer = torch.optim.AdamW(parameter_groups([self.ref], 0.05), lr=1e-4, betas=(0.9, 0.95),
                                               fused=self.device.type == "cuda")  # LlamaGen: fused where available
        torch.manual_seed(0)
        student = GPT(self.config).to(self.device)
        self.student_core = student
        model = torch.compile(student) if compile_model else student
        self.projector = Projector(self.config.dim, min(2048, 4 * self.config.dim)).to(self.device)
        self.star_module = StudentWithProjector(model, self.projector).train()
        self.plain_module = StudentWithProjector(model, None).train()
        self.teacher = make_teacher(student)
        self.optimizer = torch.optim.AdamW(parameter_groups([student, self.projector], 0.05), lr=1e-4,
                                           betas=(0.9, 0.95), fused=True)  # as star/train/loop.py builds it
        self.star_settings = StarSettings(contrastive_layer=self.config.n_layer // 2)
        self.plain_batch = _token_batch(self.config, 2 * images, 1, self.device)  # the same number of sequences
        self.star_batch = _token_batch(self.config, images, 2, self.device)

    def ref_step(self, model=None) -> None:
        tokens = self.plain_batch.tokens[:, 0]  # [8, T]
        _, loss = (self.ref if model is None else model)(tokens[:, :-1], self.plain_batch.labels, targets=tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.ref.parameters(), 1.0)
        self.ref_optimizer.step()
        self.ref_optimizer.zero_grad(set_to_none=True)

    def _our_step(self, trainable, self_guided: bool, batch, star_settings=None) -> None:
        from star.train.objectives import batch_losses, update_teacher

        generator = torch.Generator(device=self.device).manual_seed(0)
        star_settings = (star_settings or self.star_settings) if self_guided else None
        terms = batch_losses(batch, trainable, self.teacher, star_settings, self.config, generator)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        self.optimizer.found_inf = (~torch.isfinite(grad_norm)).float()  # the trainer's on-device skip, as in loop.py
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self_guided:
            update_teacher(self.teacher, self.student_core, 0.9999)

    def plain_step(self) -> None:
        self._our_step(self.plain_module, False, self.plain_batch)

    def star_step(self) -> None:
        self._our_step(self.star_module, True, self.star_batch)


class RecipeContenders(StepContenders):
    """ST-AR's steps at the trainer's unit, the image: --batch-size counts images, and ST-AR sees each in M views.

    plain: 8 images, one view each (the baseline's step). two_views: the paper's ST-AR, 8 images x 2 views (twice
    the sequences). one_view: 8 images x 1 view with L_MIM and L_step (`--views-per-image 1 --no-view`): the same
    sequences as plain, plus the teacher's pass, the masked attention and the projector. one_view_every_2: that,
    with the teacher pass and self-guided terms on every other step only (`--star-every 2`); the other steps are
    next-token steps on the same view (the EMA updates every step)."""

    def __init__(self, spec: dict, images: int = 8, device="cpu"):
        super().__init__(spec, images=images // 2, device=device)  # plain_batch: `images` sequences, one view each
        from star.train.star_settings import StarSettings

        self.two_view_batch = _token_batch(self.config, images, 2, self.device)
        self.one_view_star_settings = StarSettings(contrastive_layer=self.config.n_layer // 2, use_view=False)
        self.steps_taken = 0

    def two_views_step(self) -> None:
        self._our_step(self.star_module, True, self.two_view_batch)

    def one_view_step(self) -> None:
        self._our_step(self.star_module, True, self.plain_batch, self.one_view_star_settings)

    def next_token_step_of_star(self, batch, star_settings) -> None:
        """A --star-every step without the self-guided terms: no teacher pass, no mask; the EMA still updates."""
        from star.train.objectives import draw_step, micro_batch_losses, update_teacher

        generator = torch.Generator(device=self.device).manual_seed(0)
        draws = draw_step(batch.tokens.shape[0], batch.tokens.shape[1], self.config, star_settings, generator,
                          self.device)
        micro_batch_losses(batch, self.star_module, star_settings, self.config, draws)["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.star_module.parameters(), 1.0)
        self.optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_teacher(self.teacher, self.student_core, 0.9999)

    def one_view_every_2_step(self) -> None:
        """Two optimizer steps (one self-guided, one next-token): the timing is halved by the caller."""
        self.one_view_step()
        self.next_token_step_of_star(self.plain_batch, self.one_view_star_settings)


RECIPE_TARGET = 1.4  # issue 24: a cheaper ST-AR step costs at most 1.4x the plain step


def bench_recipe_steps(rounds: int, spec: dict = STEP_SIZES["d384-L6"], images: int = 8) -> dict:
    """Each ST-AR recipe's step against the plain step at the same --batch-size (images), interleaved in one
    process; ratios on `ratio_clock` (CPU time at one thread). The every-2 contender takes two steps per call."""
    contenders = RecipeContenders(spec, images=images)
    steps = {"plain": contenders.plain_step, "two_views": contenders.two_views_step,
             "one_view": contenders.one_view_step, "one_view_every_2": contenders.one_view_every_2_step}
    timed = interleaved(steps, rounds)
    clock = ratio_clock()
    per_step = {name: timed[name][clock] / (2 if name.endswith("every_2") else 1) for name in steps}
    ratios = {f"{name}_over_plain": per_step[name] / per_step["plain"] for name in steps if name != "plain"}
    return {**spec, "vocab": VOCAB, "images": images, "tokens": BLOCK, "timings": timed,
            "threads": torch.get_num_threads(), "ratio_clock": clock, "seconds_per_step": per_step, **ratios,
            "chosen": "one_view", "chosen_over_plain": ratios["one_view_over_plain"],
            "target": f"chosen_over_plain <= {RECIPE_TARGET}"}


def under_autocast(step: Callable[[], None], dtype: torch.dtype) -> Callable[[], None]:
    """The step under CPU autocast, as Accelerate's mixed_precision runs it (LlamaGen's default is bf16)."""
    def run() -> None:
        with torch.autocast("cpu", dtype=dtype):
            step()
    return run


def bench_train_steps(rounds: int, compile_model: bool, sizes=STEP_SIZES, bf16: bool = False) -> dict:
    """bf16: every contender (LlamaGen's too) runs under bf16 autocast, the precision both train in on GPUs;
    on a CPU with AMX the matrix multiplies shrink, so the step's other costs weigh as they do on a GPU."""
    results = {}
    for name, spec in sizes.items():
        contenders = StepContenders(spec, compile_model=compile_model)
        steps = {"llamagen": contenders.ref_step, "plain": contenders.plain_step, "star": contenders.star_step}
        if bf16:
            steps = {key: under_autocast(step, torch.bfloat16) for key, step in steps.items()}
        if compile_model:  # LlamaGen's DDP trainer compiles by default: the fair baseline for our compiled step
            compiled_ref = torch.compile(contenders.ref)
            steps["llamagen_compiled"] = functools.partial(contenders.ref_step, compiled_ref)
        timed = interleaved(steps, rounds, warmup=2 if compile_model else 1)
        clock = ratio_clock()
        ref, plain, star = (timed[k][clock] for k in ("llamagen", "plain", "star"))
        tokens = 8 * BLOCK
        results[name] = {
            **spec, "vocab": VOCAB, "sequences": 8, "tokens": BLOCK, "compiled": compile_model,
            "precision": "bf16 autocast" if bf16 else "fp32", "timings": timed,
            "threads": torch.get_num_threads(), "ratio_clock": clock,
            "plain_speedup_vs_llamagen": ref / plain, "plain_target": ">= 1.2 (tokens/s ratio)",
            "star_over_plain": star / plain, "star_target": "<= 1.25",
            "plain_tokens_per_s": tokens / plain, "llamagen_tokens_per_s": tokens / ref,
        }
        if compile_model:
            results[name]["plain_speedup_vs_llamagen_compiled"] = timed["llamagen_compiled"][clock] / plain
    return results


def profile_star_step(spec=STEP_SIZES["d384-L6"], rows: int = 25) -> str:
    """torch.profiler table (self CPU time) of one steady-state ST-AR step."""
    from torch.profiler import ProfilerActivity, profile

    contenders = StepContenders(spec)
    contenders.star_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        contenders.star_step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def _sampling_setup():
    """The sampling benchmark's model (dim 256, 6 layers, 256 tokens) and LlamaGen's, with the same weights."""
    from star.gpt.model import GPT, GPTConfig

    config = GPTConfig.resolve({"dim": 256, "n_layer": 6, "n_head": 8, "vocab_size": 1024, "num_classes": 10,
                                "block_size": 256})
    torch.manual_seed(0)
    model = GPT(config).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)  # a non-degenerate head, so sampling does real work
    ref = RefTransformer(config).eval()
    ref.load_state_dict(model.state_dict())
    return config, model, ref


def _sampling_result(batch: int, timed: dict, lead_over: dict[str, tuple[str, str]]) -> dict:
    """lead_over: {result key: (our contender, LlamaGen's)}; each key gets LlamaGen's time / ours."""
    clock = ratio_clock()
    result = {"images": batch, "cfg_scale": 2.0, "timings": timed, "threads": torch.get_num_threads(),
              "ratio_clock": clock, "target": "speedup >= 2.4 (keep the lead)"}
    for key, (ours, theirs) in lead_over.items():
        result[key] = timed[theirs][clock] / timed[ours][clock]
        result[f"{ours}_images_per_s"] = batch / timed[ours][clock]
    return result


def bench_sampling(batches=(8, 64), rounds: int = 2) -> dict:
    """Our generate vs LlamaGen's algorithm (full-length cache with its mask, batched CFG), same weights."""
    from star.gpt.generate import generate

    config, model, ref = _sampling_setup()
    results = {}
    for batch in batches:
        labels = torch.arange(batch) % config.num_classes
        contenders = {
            "ours": lambda: generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0)),
            "llamagen": lambda: ref_generate(ref, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0)),
        }
        timed = interleaved(contenders, rounds, warmup=0)
        results[f"batch{batch}"] = _sampling_result(batch, timed, {"speedup": ("ours", "llamagen")})
    return results


def bench_sampling_compiled(batch: int = 8, rounds: int = 3) -> dict:
    """Compiled decoding on both sides (`evaluate/run.py sample --compile`; LlamaGen's sample_c2i --compile), at
    steady state: the compile itself is timed apart (first call, compile plus one run)."""
    from star.gpt.generate import generate

    config, model, ref = _sampling_setup()
    compiled_ref = torch.compile(ref)
    labels = torch.arange(batch) % config.num_classes

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    contenders = {
        "ours": lambda: generate(model, labels, cfg_scale=2.0, generator=seeded()),
        "ours_compiled": lambda: generate(model, labels, cfg_scale=2.0, generator=seeded(), compile_decode=True),
        "llamagen": lambda: ref_generate(ref, labels, cfg_scale=2.0, generator=seeded()),
        "llamagen_compiled": lambda: ref_generate(compiled_ref, labels, cfg_scale=2.0, generator=seeded()),
    }
    first_call_s = {}
    for name in ("ours_compiled", "llamagen_compiled"):
        start = time.perf_counter()
        contenders[name]()
        first_call_s[name] = time.perf_counter() - start
    same_tokens = torch.equal(contenders["ours_compiled"](), contenders["llamagen_compiled"]())
    timed = interleaved(contenders, rounds, warmup=0)
    result = _sampling_result(batch, timed, {"speedup_compiled_vs_llamagen_compiled": ("ours_compiled",
                                                                                      "llamagen_compiled"),
                                             "speedup_compiled_vs_llamagen_eager": ("ours_compiled", "llamagen"),
                                             "speedup_eager": ("ours", "llamagen")})
    result["first_call_s"] = first_call_s
    result["compiled_tokens_equal"] = same_tokens  # compiled kernels may round differently; recorded, not assumed
    return result
