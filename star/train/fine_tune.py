"""`--init-from`: what a fine-tune carries over from the checkpoint it starts from besides the weights (those are
loaded by star/train/loop.py's `init_weights_from`): AdamW's moments of the student's parameters, when the
checkpoint is one of our run folders' (--init-optimizer), and the compute the checkpoint cost (`init_cpu_s`), so a
fine-tune's curve can be drawn on its baseline's compute axis. The fine-tune's own steps count from 0."""
from __future__ import annotations

import json
from pathlib import Path

from star.checkpoint_folder import RUN_CONFIG
from star.io import load_torch_weights
from star.train.distributed import keyed_by_name
from star.train.run_folder import OPTIMIZER_NAME, read_meta

STUDENT_PREFIX = "student."  # StudentWithProjector's name for the GPT's parameters


def init_optimizer_state(init_from: str, carry: bool, param_groups: list[dict],
                         names: list[list[str]]) -> tuple[dict | None, str]:
    """(AdamW state keyed by parameter name for this run's optimizer, or None; the line that says what was done).

    param_groups: this run's optimizer.state_dict()["param_groups"] (its lr, betas, weight decay are kept); names:
    this run's parameter names per group. Only the student's entries carry over: a projector is new in a fine-tune
    and starts fresh. AdamW's per-parameter step counts carry over with the moments (its bias correction matches
    them); the run's step counter starts at 0."""
    folder = Path(init_from)
    source = folder / OPTIMIZER_NAME
    if not carry:
        return None, f"--init-from {init_from}: AdamW starts fresh (--no-init-optimizer)"
    if not folder.is_dir() or not source.is_file():
        return None, (f"--init-from {init_from}: no {OPTIMIZER_NAME} (an official LlamaGen .pt or a bare weights "
                      "file holds weights only): AdamW starts fresh")
    saved = load_torch_weights(source)
    if not keyed_by_name(saved):
        return None, (f"--init-from {init_from}: its {OPTIMIZER_NAME} is keyed by index (an older checkpoint), so its "
                      "moments cannot be matched to parameters by name: AdamW starts fresh")
    wanted = {name for group in names for name in group if name.startswith(STUDENT_PREFIX)}
    state = {name: value for name, value in saved["state"].items() if name in wanted}
    missing = sorted(wanted - state.keys())
    if missing:
        raise ValueError(f"--init-from {init_from}: its {OPTIMIZER_NAME} has no AdamW state for {len(missing)} of the "
                         f"student's parameters (e.g. {missing[0]}); pass --no-init-optimizer to start AdamW fresh")
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": group_names}
              for group, group_names in zip(param_groups, names)]
    fresh = sum(len(group) for group in names) - len(state)
    return {"state": state, "param_groups": groups}, (
        f"--init-from {init_from}: AdamW moments carried over for the student's {len(state)} parameters"
        f"{f' ({fresh} projector parameters start fresh)' if fresh else ''}; this run's steps count from 0")


def init_cpu_seconds(init_from: str, resumed_from: str | None) -> float | None:
    """The training CPU seconds the run started from: 0 for a fresh start; the --init-from checkpoint's meta.json
    `cpu_s` for a fine-tune of one of ours; None (unknown) for an official LlamaGen .pt; a resumed run keeps what its
    run folder's config.json recorded."""
    if resumed_from is not None:
        try:
            return json.loads((Path(resumed_from).parent.parent / RUN_CONFIG).read_text()).get("init_cpu_s", 0.0)
        except (OSError, ValueError):
            return 0.0
    if not init_from:
        return 0.0
    folder = Path(init_from)
    if folder.is_dir() and (folder / "meta.json").is_file():
        return float(read_meta(folder).cpu_s or 0.0)
    return None
