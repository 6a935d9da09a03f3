"""Stage three, sampling: class-conditional generation with CFG, decoded by the VQ into an ADM-style `.npz`.

Data-parallel under `accelerate launch`: global batch b (of `batch_size` samples) goes to rank b % world and is
drawn with a generator seeded from (seed, b), so the samples do not depend on the number of processes.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from star.downloads import DOWNLOAD_DIR_HELP, fetch_file
from star.eval.class_names import parse_class_names, run_class_names
from star.eval.generator import WEIGHT_CHOICES, ValueNames, load_generator, resolve_checkpoint
from star.eval.sample_store import assemble, is_token_array, part_is_done, parts_folder, write_part
from star.eval.tokenizer import DecoderChoice, find_tokenizer
from star.gpt.generate import CFG_SCHEDULES, DECODE_MODES, SamplingSettings, generate
from star.gpt.model import GPTConfig
from star.io import check_output_file
from star.runtime import autocast_dtype, indexed_seed, pick_device, resolve_precision
from star.settings import check, check_device, flag_spec, setting

SAMPLE_PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINT_FLAGS = ValueNames(ckpt="--ckpt", model="--model", weights="--weights")  # how errors name them


def parse_int_list(text: str, what: str) -> list[int]:
    """'1, 6,12' -> [1, 6, 12]; a non-integer entry is an error naming the flag."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected a comma-separated list of integers") from None


SAMPLING_FLAGS = {  # SamplingSettings (star/gpt) as flags of this command
    "cfg_scale": flag_spec(help="classifier-free guidance scale (1.0 = off)"),
    "cfg_schedule": flag_spec(choices=CFG_SCHEDULES, help="guidance over the steps"),
    "cfg_interval": flag_spec(help="LlamaGen's cfg-interval: CFG off after this decode step (-1 = never)"),
    "temperature": flag_spec(help="sampling temperature (>= 0)"),
    "top_k": flag_spec(help="keep the k most likely tokens (0 = all)"),
    "top_p": flag_spec(help="nucleus filter (1.0 = off)"),
    "decode": flag_spec(choices=DECODE_MODES, help="static (whole cache, fixed shapes: CUDA graphs) or dynamic "
                                                   "(filled slots only) decoding; auto: static on CUDA"),
    "compile_decode": flag_spec(flag="compile", help="torch.compile the decode step"),
}


@dataclass
class SampleConfig:
    """Settings of `evaluate/run.py sample` (flags generated from these fields; checked on creation)."""

    ckpt: str = setting(help="run folder (newest checkpoint), checkpoint folder, .safetensors, or LlamaGen .pt "
                             "(a path, an official name such as c2i_B_256.pt, or a URL)")
    out: str = setting(help="output folder: samples.npz, grid.png, settings.json")
    model: str = setting("", help="preset or JSON (needed for official LlamaGen checkpoints)")
    weights: str = setting("student", choices=WEIGHT_CHOICES, help="student, or the EMA teacher of an ST-AR run")
    vq_ckpt: str = setting("", help="VQ checkpoint that decodes the tokens: a path, vq_ds16_c2i.pt or a URL "
                                    "(default: the one the run recorded; not needed with --tokens-only)")
    download_dir: str = setting("", help=DOWNLOAD_DIR_HELP)
    vq_config: str = setting("", help="VQ preset or JSON (default: the run's record, else the JSON beside "
                                      "--vq-ckpt, else VQ-16)")
    allow_other_tokenizer: bool = setting(False, help="sample with a VQ other than the one the checkpoint was "
                                                      "trained on (warn instead of refusing)")
    sampling: SamplingSettings = setting(default_factory=SamplingSettings, nested=SAMPLING_FLAGS)
    num_samples: int = setting(50, help="images to sample")
    classes: str = setting("", help="comma list of class ids to cycle (empty: balanced over all classes)")
    batch_size: int = setting(32, help="images per batch (CFG doubles the model's batch)")
    seed: int = setting(0, help="global seed; batch b uses (seed, b), independent of the process count")
    tokens_only: bool = setting(False, help="write tokens.npz instead of decoding images")
    save_tokens: str = setting("", help="also save the tokens [N, T] as this .npy")
    overwrite: bool = setting(False, help="let --save-tokens replace a file that is not a token array this tool wrote")
    image_size_eval: int = setting(0, help="bicubic resize of decoded images for evaluation (e.g. 384 -> 256; 0 = keep)")
    class_names: str = setting("", help="names for grid.png's rows: a shard folder (its manifest's classes) or names in "
                                        "class-id order separated by commas (empty: the run's training shards when "
                                        "they still hold its data, else class ids)")
    grid_per_class: int = setting(16, help="grid.png: the first this many samples of each class (0 = all)")
    grid_classes: int = setting(16, help="grid.png: a row for each of the first this many classes (0 = all)")
    precision: str = setting("auto", choices=SAMPLE_PRECISIONS, help="auto: bf16 on CUDA, fp32 on CPU")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N (under accelerate launch: the launcher's)")
    progress: bool = setting(True, help="progress bar")

    def __post_init__(self) -> None:
        check(bool(self.ckpt), "--ckpt is required")
        check(bool(self.out), "--out is required")
        check(self.weights in WEIGHT_CHOICES, f"--weights {self.weights!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
        check(self.precision in SAMPLE_PRECISIONS,
              f"--precision {self.precision!r}: choose one of {', '.join(SAMPLE_PRECISIONS)}")
        check_device(self.device)
        check(self.num_samples > 0, f"--num-samples {self.num_samples}: must be > 0")
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be > 0")
        check(self.grid_per_class >= 0, f"--grid-per-class {self.grid_per_class}: must be >= 0 (0 = all)")
        check(self.grid_classes >= 0, f"--grid-classes {self.grid_classes}: must be >= 0 (0 = all)")
        check(self.image_size_eval >= 0, f"--image-size-eval {self.image_size_eval}: must be >= 0 (0 = keep)")
        check(all(c >= 0 for c in self.class_ids), f"--classes {self.classes}: ids >= 0")
        if isinstance(self.class_names, (list, tuple)):  # a library caller's names in class-id order
            check(not any("," in str(name) for name in self.class_names),
                  f"class_names {self.class_names}: a name holds a comma, which separates names")
            self.class_names = ",".join(str(name) for name in self.class_names) + ","
        if isinstance(self.sampling, dict):  # settings.json, or a library caller's plain dict
            self.sampling = SamplingSettings(**self.sampling)

    @property
    def class_ids(self) -> list[int]:
        """The --classes ids, in order (empty: all classes)."""
        return parse_int_list(self.classes, "--classes")


def sample_labels(num_samples: int, num_classes: int, class_ids: list[int]) -> torch.Tensor:
    """Balanced over all classes (i % num_classes), or cycling the given ids (`SampleConfig.class_ids`, >= 0)."""
    if class_ids:
        bad = [c for c in class_ids if c >= num_classes]  # the model's classes: known only once it is loaded
        if bad:
            raise ValueError(f"--classes {bad} outside 0..{num_classes - 1}")
        return torch.tensor(class_ids)[torch.arange(num_samples) % len(class_ids)]
    return torch.arange(num_samples) % num_classes


def load_decoder(choice: DecoderChoice, model_config: GPTConfig, device: torch.device):
    """The VQ that turns tokens into images; its codebook must cover every token the model can sample."""
    from star.vq.model import load_vq

    vq = load_vq(choice.checkpoint, choice.config).to(device).eval()
    if vq.config.codebook_size < model_config.vocab_size:
        raise ValueError(f"--vq-ckpt {choice.checkpoint}: codebook of {vq.config.codebook_size} codes cannot decode "
                         f"the model's vocabulary of {model_config.vocab_size} tokens; use the VQ the model was trained "
                         "with")
    return vq


def tokens_to_uint8(vq, tokens: torch.Tensor, grid: int, image_size_eval: int = 0) -> np.ndarray:
    """[B, T] tokens -> uint8 [B, H, W, 3] (LlamaGen: clamp(127.5 x + 128), truncated)."""
    with torch.inference_mode():
        images = vq.decode_indices(tokens.reshape(-1, grid, grid)).float()  # [B, 3, H, W]
        if image_size_eval and image_size_eval != images.shape[-1]:
            images = torch.nn.functional.interpolate(images, size=(image_size_eval, image_size_eval), mode="bicubic")
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sampling_device(config: SampleConfig):
    """(accelerate state, device): the launcher's device under a multi-process launch, else --device."""
    from accelerate import PartialState

    device = pick_device(config.device)
    state = PartialState(cpu=device.type == "cpu")
    return state, (state.device if state.num_processes > 1 else device)


def check_outputs(config: SampleConfig, checkpoint_file: Path) -> None:
    """Before any work: --save-tokens may only replace a token array this tool wrote, never an input."""
    if config.save_tokens:
        check_output_file(config.save_tokens, "--save-tokens", "token array", is_token_array,
                          inputs=(checkpoint_file, config.vq_ckpt), overwrite=config.overwrite)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for samples.npz, grid.png and settings.json")


def grid_class_names(config: SampleConfig, checkpoint_file: Path, num_classes: int) -> tuple[dict[int, str], str]:
    """(id -> name, where the names came from) for grid.png: --class-names, else the run's training shards."""
    if config.class_names:
        return parse_class_names(config.class_names, num_classes)
    return run_class_names(checkpoint_file)


def run_sampling(config: SampleConfig) -> dict:
    """Sample, decode and write samples.npz + grid.png + settings.json (or tokens.npz), each atomically.

    Everything that can be checked is checked before the first token is drawn: the settings (on creation),
    the checkpoint, the outputs, the tokenizer against the one the checkpoint records, and the VQ codebook size.
    Each batch is written as it is made (a crashed run resumes from its finished batches); the final arrays are
    assembled by streaming the batches into the .npz, never holding all the images at once.
    """
    started = time.time()
    config = replace(config, ckpt=fetch_file(config.ckpt, "--ckpt", config.download_dir, config.progress),
                     vq_ckpt=config.vq_ckpt if config.tokens_only or not config.vq_ckpt else
                     fetch_file(config.vq_ckpt, "--vq-ckpt", config.download_dir, config.progress))
    state, device = sampling_device(config)
    checkpoint_file = resolve_checkpoint(config.ckpt, config.weights, CHECKPOINT_FLAGS)
    if config.weights == "teacher" and checkpoint_file.name != "teacher.safetensors":
        raise ValueError(f"--weights teacher: {checkpoint_file} is not an ST-AR run's teacher.safetensors; "
                         "use --weights student, or give the run or checkpoint folder")
    decoder = None if config.tokens_only else find_tokenizer(config.vq_ckpt, config.vq_config, checkpoint_file,
                                                              config.allow_other_tokenizer)
    if decoder is not None:  # the file found is the one the batches and settings.json name
        config = dataclasses.replace(config, vq_ckpt=str(decoder.checkpoint))
    check_outputs(config, checkpoint_file)
    model = load_generator(config.ckpt, config.model, config.weights, CHECKPOINT_FLAGS).to(device)
    precision = resolve_precision(config.precision, device)
    if autocast_dtype(precision) is not None:
        model = model.to(autocast_dtype(precision))
    vq = None if decoder is None else load_decoder(decoder, model.config, device)
    labels = sample_labels(config.num_samples, model.config.num_classes, config.class_ids)
    class_names, names_source = grid_class_names(config, checkpoint_file, model.config.num_classes)
    batches = [(b, labels[start : start + config.batch_size])
               for b, start in enumerate(range(0, len(labels), config.batch_size))]
    parts = parts_folder(config, checkpoint_file)
    parts.mkdir(parents=True, exist_ok=True)
    mine = [(b, batch_labels) for b, batch_labels in batches[state.process_index :: state.num_processes]
            if not part_is_done(parts, b, len(batch_labels))]
    bar = tqdm(mine, desc="sample", unit="batch", disable=not (config.progress and state.is_main_process))
    for batch_index, batch_labels in bar:
        generator = torch.Generator(device=device).manual_seed(indexed_seed(config.seed, batch_index))
        tokens = generate(model, batch_labels.to(device), config.sampling, generator)  # [b, T]
        images = tokens_to_uint8(vq, tokens, model.config.grid_size, config.image_size_eval) if vq is not None else None
        write_part(parts, batch_index, tokens.cpu().numpy(), images)
    state.wait_for_everyone()
    summary = {"num_samples": config.num_samples, "seconds": round(time.time() - started, 2), "out": str(config.out),
               "reused_batches": len(batches[state.process_index :: state.num_processes]) - len(mine)}
    if state.is_main_process:
        resolved = {"precision": precision, "decode": config.sampling.decode_mode(device),
                    "device": str(device), "world_size": state.num_processes, "checkpoint_file": str(checkpoint_file),
                    "tokenizer_check": None if decoder is None else decoder.check,
                    "tokenizer": None if decoder is None else {"checkpoint": str(decoder.checkpoint),
                                                               "found": decoder.found,
                                                               "config_from": decoder.config_from},
                    "class_names": names_source}
        summary.update(assemble(parts, len(batches), labels.numpy(), config, resolved, class_names))
        shutil.rmtree(parts, ignore_errors=True)
    state.wait_for_everyone()
    return summary


def format_sampling_summary(summary: dict) -> str:
    """One line for the main process; "" on the other ranks (they wrote only their part)."""
    written = ", ".join(f"{k}: {v}" for k, v in summary.items() if k in ("samples", "grid", "tokens", "tokens_npz"))
    return f"{summary['num_samples']} samples in {summary['seconds']} s -> {written}" if written else ""
