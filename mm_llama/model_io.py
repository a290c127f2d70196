"""Checkpoint folders of :class:`~mm_llama.model.MultimodalLM`: save, load, fingerprint.

A checkpoint folder (safetensors only)::

    mm_llama.yaml            the ModelConfig
    projectors.safetensors   every projector's weights, keyed "<modality>.<param>"
    encoders/<m>.safetensors encoder weights, for encoders that trained or were built from scratch
    tokenizer/               the tokenizer with the added marker tokens
    processor.yaml           what the standalone processor needs (MultimodalProcessor.from_pretrained)
    adapter/                 a PEFT (LoRA) adapter, when the LLM was fine-tuned with one
    llm/                     the LLM itself, only when saved with ``copy_llm=True``
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer

from mm_llama.config import LLMConfig, ModelConfig, load_config, save_config, to_dict
from mm_llama.processor import MODEL_CONFIG_FILE as CONFIG_FILE
from mm_llama.processor import TOKENIZER_DIR

if TYPE_CHECKING:
    from mm_llama.model import MultimodalLM

logger = logging.getLogger(__name__)

PROJECTORS_FILE = "projectors.safetensors"
ENCODERS_DIR = "encoders"
ADAPTER_DIR = "adapter"
LLM_DIR = "llm"


class CheckpointMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``fingerprint``; mixed into ``MultimodalLM``."""

    def save_pretrained(
        self, path: str | Path, copy_llm: bool = False, state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> Path:
        """Write the checkpoint folder (see the module docstring). The LLM and pretrained frozen encoders
        are referenced by id/path; ``copy_llm=True`` also writes the LLM to ``llm/``, with a LoRA adapter
        merged into it (this model's LLM is then the merged one, and no ``adapter/`` is written).
        ``state_dict`` (names as in :meth:`state_dict`) is written instead of the live tensors: what a
        sharded (FSDP) run gathers on its main process, where this model holds only shards."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config

        def part(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
            if state_dict is None:
                return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

        state = {
            f"{name}.{k}": v
            for name, p in self.projectors.items()
            for k, v in part(f"projectors.{name}.", p).items()
        }
        save_file(state, path / PROJECTORS_FILE)
        for name in self._own_encoders():
            (path / ENCODERS_DIR).mkdir(exist_ok=True)
            save_file(
                part(f"encoders.{name}.", self.encoders[name]), path / ENCODERS_DIR / f"{name}.safetensors"
            )
        self.processor.save_pretrained(path)  # tokenizer/ and processor.yaml
        llm_state = None if state_dict is None else part("llm.", self.llm)
        if copy_llm:
            if hasattr(self.llm, "merge_and_unload"):  # the adapter goes into the copy, not beside it
                if state_dict is not None:
                    raise ValueError(
                        "save_pretrained: a LoRA adapter cannot be merged from a gathered state_dict"
                    )
                self.llm = self.llm.merge_and_unload()
                shutil.rmtree(path / ADAPTER_DIR, ignore_errors=True)
            self.llm.save_pretrained(path / LLM_DIR, safe_serialization=True, state_dict=llm_state)
            config = replace(config, llm=replace(config.llm, name_or_path=LLM_DIR, from_config=None))
        elif hasattr(self.llm, "peft_config"):
            self.llm.save_pretrained(path / ADAPTER_DIR, state_dict=llm_state)
        save_config(config, path / CONFIG_FILE)
        return path

    def _own_encoders(self) -> list[str]:
        """The encoders whose weights are this model's own (built from scratch, or training): a checkpoint
        stores them, where pretrained frozen ones are named by the config."""
        return [
            name
            for name, encoder in self.encoders.items()
            if not encoder.is_pretrained or any(p.requires_grad for p in encoder.parameters())
        ]

    def fingerprint(self) -> str:
        """A SHA-256 of what identifies this model's answers: its config, projectors, encoders built from
        scratch or trained, and any LoRA weights (the frozen LLM and pretrained encoders are named by the
        config). The eval runner keeps it in ``run.json`` so answers of a retrained model are never mixed
        with older ones."""
        digest = hashlib.sha256(yaml.safe_dump(to_dict(self.config), sort_keys=True).encode())
        tensors = {f"projectors.{k}": v for k, v in self.projectors.state_dict().items()}
        for name in self._own_encoders():
            tensors.update({f"encoders.{name}.{k}": v for k, v in self.encoders[name].state_dict().items()})
        tensors.update({k: v for k, v in self.llm.named_parameters() if "lora_" in k})
        for key in sorted(tensors):
            digest.update(key.encode())
            digest.update(tensors[key].detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    @classmethod
    def from_pretrained(cls, path: str | Path, llm: LLMConfig | None = None) -> MultimodalLM:
        """Load a checkpoint folder written by :meth:`save_pretrained`. ``llm`` overrides how the LLM
        loads (e.g. in 4 bits) while keeping the trained projectors."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not an mm_llama checkpoint: {CONFIG_FILE} not found in it")
        config = load_config(ModelConfig, path / CONFIG_FILE)
        if llm is not None:
            config = replace(config, llm=llm)
        if config.llm.name_or_path == LLM_DIR and (path / LLM_DIR).is_dir():
            config = replace(config, llm=replace(config.llm, name_or_path=str(path / LLM_DIR)))
        tokenizer = (
            AutoTokenizer.from_pretrained(path / TOKENIZER_DIR) if (path / TOKENIZER_DIR).is_dir() else None
        )
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if config.llm.from_config is not None:
            # A randomly initialised LLM cannot be rebuilt from its config: its weights live in llm/.
            raise ValueError(
                f"{path / CONFIG_FILE}: llm.from_config is set, so the LLM weights are not referenced by any "
                "id or path; save such models with save_pretrained(..., copy_llm=True)"
            )
        model = cls(config, tokenizer=tokenizer)
        model._load_trained(path)
        return model

    def load_trained_parts(self, path: Path, missing_projectors_ok: bool = False) -> None:
        """Load the projector and encoder weights that :meth:`save_pretrained` wrote into ``path`` (not
        the adapter). With ``missing_projectors_ok``, a modality the saved model lacks keeps its fresh
        projector (a warning says so); otherwise strict loading raises."""
        state = load_file(path / PROJECTORS_FILE)
        for name, projector in self.projectors.items():
            prefix = f"{name}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub and missing_projectors_ok:
                logger.warning("%s has no %s projector: it starts from random weights", path, name)
                continue
            projector.load_state_dict(sub, strict=True)
        for name, encoder in self.encoders.items():
            file = path / ENCODERS_DIR / f"{name}.safetensors"
            if file.is_file():
                encoder.load_state_dict(load_file(file), strict=True)

    def _load_trained(self, path: Path) -> None:
        self.load_trained_parts(path)
        if (path / ADAPTER_DIR).is_dir():
            from peft import PeftModel

            self.llm = PeftModel.from_pretrained(self.llm, path / ADAPTER_DIR)
