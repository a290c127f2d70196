"""Resumable training checkpoints: safetensors + JSON, written atomically.

A checkpoint holds exactly what is needed to continue a stage as if it had never stopped::

    <stage dir>/checkpoints/step-000120/
        trainable.safetensors     parameters that train (projectors, trainable encoders, LoRA or the
                                  full LLM) and the persistent buffers of the modules that own them
        optimizer.safetensors     AdamW moments, keyed "<param index>.<name>"
        optimizer.json            param groups and scalar state
        scheduler.json            the LR scheduler's state
        rng-<rank>.safetensors    torch (CPU and CUDA) generator states of each process
        rng-<rank>.json           Python and NumPy generator states of each process
        trainer_state.json        step, epoch, position in the epoch, loss history, the stage config

It is written to a hidden temporary folder and renamed into place, so a crash mid-write never leaves a
half checkpoint that a resume would pick up. No pickles: everything loads without executing code.

Under FSDP (accelerate's FSDP2: parameters and AdamW moments are ``DTensor`` shards) every process
takes part in a save, which all-gathers the shards into full tensors, and in a load, which cuts the
full tensors back into each process's shards; the files are the same as a single process writes, so a
run may resume on another number of processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

CHECKPOINTS_DIR = "checkpoints"
STEP_DIR_RE = re.compile(r"^step-(\d+)$")
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_META_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
STATE_FILE = "trainer_state.json"
TUPLE_GROUP_KEYS = ("betas",)
"""Optimizer param-group fields that are tuples (JSON turns them into lists)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _rng_files(rank: int) -> tuple[str, str]:
    return f"rng-{rank}.safetensors", f"rng-{rank}.json"


@dataclass
class RNGState:
    """The random generators of one process (Python, NumPy, torch CPU and CUDA)."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def capture(cls) -> RNGState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.torch_cuda)

    def save(self, directory: Path, rank: int) -> None:
        tensors_file, meta_file = _rng_files(rank)
        tensors = {
            "torch_cpu": self.torch_cpu,
            "numpy_keys": torch.from_numpy(self.numpy[1].astype(np.int64)),
        }
        tensors |= {f"torch_cuda.{i}": s for i, s in enumerate(self.torch_cuda)}
        save_file(tensors, str(directory / tensors_file))
        version, state, gauss = self.python
        meta = {
            "python": [version, list(state), gauss],
            "numpy": [self.numpy[0], int(self.numpy[2]), int(self.numpy[3]), float(self.numpy[4])],
            "num_cuda": len(self.torch_cuda),
        }
        (directory / meta_file).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path, rank: int) -> RNGState | None:
        """The saved state of process ``rank``, or ``None`` when that process did not write one."""
        tensors_file, meta_file = _rng_files(rank)
        if not (directory / tensors_file).is_file():
            return None
        tensors = load_file(str(directory / tensors_file))
        meta = json.loads((directory / meta_file).read_text())
        version, state, gauss = meta["python"]
        name, pos, has_gauss, cached = meta["numpy"]
        keys = tensors["numpy_keys"].numpy().astype(np.uint32)
        cuda = [tensors[f"torch_cuda.{i}"] for i in range(meta["num_cuda"])]
        return cls(
            (version, tuple(state), gauss), (name, keys, pos, has_gauss, cached), tensors["torch_cpu"], cuda
        )


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP holds ``model``'s parameters as shards (``DTensor``): saving it is then collective."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _gather(named: Iterable[tuple[str, torch.Tensor]], keep: bool = True) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, each all-gathered first if it is a shard (a collective: on a sharded model
    every process calls it, in the same order). A process that writes nothing (``keep=False``) drops
    each gathered tensor at once and gets ``{}``."""
    out: dict[str, torch.Tensor] = {}
    for name, t in named:
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = full.detach().cpu().contiguous()
    return out


def _like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A full tensor read from a file, as ``target`` holds it: this process's shard if ``target`` is one."""
    if isinstance(target, DTensor):
        return distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
    return value


def trainable_state(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Parameters with ``requires_grad`` and the persistent buffers of the modules that own them (see
    :func:`_gather` for a sharded model and ``keep``)."""
    named: list[tuple[str, torch.Tensor]] = []
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        prefix = f"{module_name}." if module_name else ""
        named += [(prefix + name, p) for name, p in own if p.requires_grad]
        named += [
            (prefix + name, b)
            for name, b in module.named_buffers(recurse=False)
            if b is not None and name not in module._non_persistent_buffers_set
        ]
    return _gather(named, keep)


def full_state(model: nn.Module, with_frozen_llm: bool, keep: bool = True) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` gathered on the CPU (see :func:`_gather`); the frozen weights under ``llm.``
    only if ``with_frozen_llm`` (a LoRA run saves its adapter, not them). What
    :meth:`MultimodalLM.save_pretrained` writes at the end of a sharded run."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    named = [
        (name, value)
        for name, value in model.state_dict(keep_vars=True).items()
        if with_frozen_llm or name in trainable or not name.startswith("llm.")
    ]
    return _gather(named, keep)


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy a :func:`trainable_state` into ``model``; every key must exist and every trainable
    parameter must be covered."""
    own = model.state_dict(keep_vars=True)
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} tensor(s) not in the model, e.g. {unknown[:3]}")
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in state)
    if missing:
        raise ValueError(f"{where}: no value for {len(missing)} trainable parameter(s), e.g. {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(_like(value, own[name]))


def _optimizer_files(
    state: dict[str, Any], keep: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    named: list[tuple[str, torch.Tensor]] = []
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                named.append((f"{index}.{key}", value))
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors = _gather(named, keep)
    keys = {str(index): list(entry) for index, entry in state["state"].items()}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "keys": keys}


def _optimizer_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], params: list[torch.Tensor]
) -> dict[str, Any]:
    """The optimizer state dict back from its files; moments of a sharded parameter become its shards."""
    state = {}
    for index, keys in meta["keys"].items():
        scalars = meta["scalars"].get(index, {})
        param = params[int(index)]
        state[int(index)] = {
            k: _moment(tensors[f"{index}.{k}"], param) if f"{index}.{k}" in tensors else scalars[k]
            for k in keys
        }
    groups = [
        {k: tuple(v) if k in TUPLE_GROUP_KEYS else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _moment(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return _like(value, param) if value.shape == param.shape else value  # AdamW's scalar "step" stays


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    rng: RNGState,
    rank: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write a checkpoint atomically into ``directory`` (a ``step-NNNNNN`` folder).

    Every process calls it with its own ``rng``; ``barrier`` synchronises them (pass a no-op on the
    crash path, where only the main process writes: a sharded model has no crash path, its shards are
    on every process). Returns the final folder."""
    sharded = is_sharded(model)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng.save(tmp, rank)
    barrier()
    if is_main or sharded:  # the other processes take part in gathering the shards, and keep nothing
        trainable = trainable_state(model, keep=is_main)
        opt_tensors, opt_meta = _optimizer_files(optimizer.state_dict(), keep=is_main)
    if is_main:
        save_file(trainable, str(tmp / TRAINABLE_FILE))
        save_file(opt_tensors, str(tmp / OPTIMIZER_TENSORS_FILE))
        (tmp / OPTIMIZER_META_FILE).write_text(json.dumps(opt_meta))
        (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    barrier()
    return directory


def load_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
) -> tuple[dict[str, Any], RNGState | None]:
    """Restore weights, optimizer and scheduler from ``directory``; return the trainer state and this
    process's saved RNG state (``None`` if it wrote none). The caller restores the RNG last."""
    load_trainable_state(model, load_file(str(directory / TRAINABLE_FILE)), str(directory / TRAINABLE_FILE))
    meta = json.loads((directory / OPTIMIZER_META_FILE).read_text())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors = load_file(str(directory / OPTIMIZER_TENSORS_FILE))
    optimizer.load_state_dict(_optimizer_state(tensors, meta, params))
    scheduler.load_state_dict(json.loads((directory / SCHEDULER_FILE).read_text()))
    return read_trainer_state(directory), RNGState.load(directory, rank)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (step, history, the stage config it was written with)."""
    return json.loads((directory / STATE_FILE).read_text())


def list_checkpoints(stage_dir: Path) -> list[Path]:
    """Finished checkpoints of a stage, oldest first."""
    root = stage_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(stage_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` (>= 1) newest checkpoints."""
    for old in list_checkpoints(stage_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
