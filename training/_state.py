"""Optimizer state as safetensors + JSON (no pickle), for exact resumption."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_TENSORS = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path, trainer_state: dict) -> None:
    """Write the optimizer's tensors and the JSON-able rest (hyper-parameters, step) into ``folder``."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, folder / OPTIMIZER_TENSORS)
    payload = {"trainer": trainer_state, "param_groups": state["param_groups"], "scalars": scalars}
    (folder / TRAINER_STATE).write_text(json.dumps(payload, indent=2) + "\n")


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> dict:
    """Restore ``optimizer`` from ``folder``; returns the trainer state saved with it."""
    payload = json.loads((folder / TRAINER_STATE).read_text())
    state: dict[int, dict] = {}
    for name, tensor in load_file(folder / OPTIMIZER_TENSORS).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for name, value in payload["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": payload["param_groups"]})
    return payload["trainer"]


def has_training_state(folder: Path) -> bool:
    return (folder / TRAINER_STATE).is_file() and (folder / OPTIMIZER_TENSORS).is_file()
