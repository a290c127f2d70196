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
from mm_llama.errors import MMInputError
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
        merged into it (no ``adapter/`` is written). A 4-bit LLM's adapter is merged into a
        full-precision reload of its base, never into the quantized weights; an unquantized one is
        merged in place (this model's LLM is then the merged one). ``copy_llm`` never writes into the
        folder the model was loaded from. ``state_dict`` (names as in :meth:`state_dict`) is written
        instead of the live tensors: what a sharded (FSDP) run gathers on its main process, where this
        model holds only shards."""
        path = Path(path)
        source = getattr(self, "_source", None)
        if copy_llm and source is not None and path.resolve() == source.resolve():
            raise MMInputError(
                f"save_pretrained: {path} is the folder this model was loaded from; write the copy with the "
                "LLM into another folder (its adapter/ would be replaced by a merged llm/)"
            )
        path.mkdir(parents=True, exist_ok=True)
        owned = self._own_encoders()
        modalities = {
            name: replace(spec, encoder=replace(spec.encoder, owned=name in owned))
            for name, spec in self.config.modalities.items()
        }
        config = replace(self.config, modalities=modalities, llm=replace(self.config.llm, adapter=None))

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
        for name in owned:
            (path / ENCODERS_DIR).mkdir(exist_ok=True)
            save_file(
                part(f"encoders.{name}.", self.encoders[name]), path / ENCODERS_DIR / f"{name}.safetensors"
            )
        self.processor.save_pretrained(path)  # tokenizer/ and processor.yaml
        llm_state = None if state_dict is None else part("llm.", self.llm)
        if copy_llm:
            llm = self.llm
            if hasattr(llm, "merge_and_unload"):  # the adapter goes into the copy, not beside it
                if state_dict is not None:
                    raise ValueError(
                        "save_pretrained: a LoRA adapter cannot be merged from a gathered state_dict"
                    )
                if self.config.llm.quantization != "none":
                    llm = self._merged_full_precision()
                else:
                    llm = self.llm = self.llm.merge_and_unload()
                shutil.rmtree(path / ADAPTER_DIR, ignore_errors=True)
            llm.save_pretrained(path / LLM_DIR, safe_serialization=True, state_dict=llm_state)
            config = replace(
                config,
                llm=replace(config.llm, name_or_path=LLM_DIR, from_config=None, quantization="none"),
            )
        elif hasattr(self.llm, "peft_config"):
            self.llm.save_pretrained(path / ADAPTER_DIR, state_dict=llm_state)
            config = replace(config, llm=replace(config.llm, adapter=ADAPTER_DIR))
        save_config(config, path / CONFIG_FILE)
        return path

    def _merged_full_precision(self) -> nn.Module:
        """The LLM's base reloaded unquantized (float32), with this model's LoRA adapter merged into it."""
        import tempfile

        from peft import PeftModel

        from mm_llama.llm import load_llm

        base = load_llm(
            replace(self.config.llm, quantization="none", dtype="float32", adapter=None),
            vocab_size=len(self.tokenizer),
        )
        with tempfile.TemporaryDirectory(prefix="mm-llama-adapter-") as tmp:
            self.llm.save_pretrained(tmp)
            merged = PeftModel.from_pretrained(base, tmp).merge_and_unload()
        return merged

    def _own_encoders(self) -> list[str]:
        """The encoders whose weights are this model's own, which a checkpoint stores (pretrained frozen
        ones are named by the config): built from scratch, loaded from a checkpoint's own weights
        (``owned`` in its config), or trainable now."""
        owned = getattr(self, "_owned", set())
        return [
            name
            for name, encoder in self.encoders.items()
            if not encoder.is_pretrained
            or name in owned
            or self.config.modalities[name].encoder.owned
            or any(p.requires_grad for p in encoder.parameters())
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
    def from_pretrained(
        cls, path: str | Path, llm: LLMConfig | None = None, trust_remote_code: bool = False
    ) -> MultimodalLM:
        """Load a checkpoint folder written by :meth:`save_pretrained`, in eval mode. ``llm`` overrides
        how the LLM loads (e.g. in 4 bits) while keeping the trained projectors and the adapter.
        ``trust_remote_code`` is yours to give: a saved config's own setting is ignored, so opening a
        checkpoint never runs code that came with it. A file the config says the checkpoint has
        (an owned encoder's weights, the adapter) must be there, or loading fails naming it."""
        path = Path(path)
        if not path.is_dir():
            raise MMInputError(
                f"checkpoint {path}: expected a folder written by save_pretrained or training, "
                f"found {'a file' if path.exists() else 'nothing'}"
            )
        if not (path / CONFIG_FILE).is_file():
            raise MMInputError(f"{path} is not an mm_llama checkpoint: {CONFIG_FILE} not found in it")
        config = load_config(ModelConfig, path / CONFIG_FILE)
        if config.llm.trust_remote_code and not trust_remote_code:
            logger.warning(
                "%s asks for trust_remote_code; ignored (pass trust_remote_code=True yourself to allow it)",
                path / CONFIG_FILE,
            )
        if llm is not None:
            config = replace(config, llm=replace(llm, adapter=llm.adapter or config.llm.adapter))
        config = replace(config, llm=replace(config.llm, trust_remote_code=trust_remote_code))
        if config.llm.name_or_path == LLM_DIR and (path / LLM_DIR).is_dir():
            config = replace(config, llm=replace(config.llm, name_or_path=str(path / LLM_DIR)))
        tokenizer = (
            AutoTokenizer.from_pretrained(path / TOKENIZER_DIR) if (path / TOKENIZER_DIR).is_dir() else None
        )
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if config.llm.from_config is not None:
            # A randomly initialised LLM cannot be rebuilt from its config: its weights live in llm/.
            raise MMInputError(
                f"{path / CONFIG_FILE}: llm.from_config is set, so the LLM weights are not referenced by any "
                "id or path; save such models with save_pretrained(..., copy_llm=True)"
            )
        adapter = config.llm.adapter
        if adapter is not None and not (path / adapter).is_dir():
            raise MMInputError(
                f"{path}: its {CONFIG_FILE} says the LLM carries a LoRA adapter in {adapter}/, but "
                f"{path / adapter} is missing; the base LLM alone would answer differently"
            )
        model = cls(replace(config, llm=replace(config.llm, adapter=None)), tokenizer=tokenizer)
        model.load_trained_parts(path)
        if adapter is not None:
            from peft import PeftModel

            model.llm = PeftModel.from_pretrained(model.llm, path / adapter)
            model.config = replace(model.config, llm=replace(model.config.llm, adapter=adapter))
        model._source = path
        return model.eval()

    def load_trained_parts(self, path: Path, missing_projectors_ok: bool = False) -> None:
        """Load the projector and encoder weights that :meth:`save_pretrained` wrote into ``path`` (not
        the adapter). With ``missing_projectors_ok``, a modality the saved model lacks keeps its fresh
        projector (a warning says so); otherwise strict loading raises. An encoder the saved config
        marks ``owned`` must have its weights file; encoders loaded from one stay owned by this model
        (a later save stores them, even if they are frozen now)."""
        saved = load_config(ModelConfig, path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else None
        state = _read_safetensors(path / PROJECTORS_FILE)
        for name, projector in self.projectors.items():
            prefix = f"{name}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub and missing_projectors_ok:
                logger.warning("%s has no %s projector: it starts from random weights", path, name)
                continue
            _load_strict(projector, sub, path / PROJECTORS_FILE, f"the {name} projector")
        self._owned = set(getattr(self, "_owned", set()))
        for name, encoder in self.encoders.items():
            file = path / ENCODERS_DIR / f"{name}.safetensors"
            if file.is_file():
                _load_strict(encoder, _read_safetensors(file), file, f"the {name} encoder")
                self._owned.add(name)
            elif (
                saved is not None
                and name in saved.modalities
                and (saved.modalities[name].encoder.owned or not encoder.is_pretrained)
            ):
                raise MMInputError(
                    f"{path}: its {CONFIG_FILE} says the {name} encoder's weights are stored in "
                    f"{ENCODERS_DIR}/{name}.safetensors, but that file is missing"
                )


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], file: Path, what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, with a mismatch named by file and configuration."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MMInputError(
            f"{file}: its weights do not fit {what} its config builds (another architecture or options?): "
            + str(e).split(":", 1)[-1].strip().replace("\n", " ")[:500]
        ) from e


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise MMInputError(f"{file}: expected a safetensors weights file, found nothing")
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise MMInputError(f"{file}: not a readable safetensors file ({e})") from e
