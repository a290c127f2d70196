"""LLaVA checkpoints in, llava-hf out.

In (:func:`from_llava`, ``mm-llama import-llava``):

- a **llava-hf folder** (``LlavaForConditionalGeneration.save_pretrained`` with its ``LlavaProcessor``):
  the vision tower becomes a frozen ``hf_vision`` encoder built from its config (the mm_llama checkpoint
  stores its weights), with the processor's image settings; the projector an ``mlp2x_gelu`` (``linear``
  for ``projector_hidden_act: linear``); the LLM is taken over as it is (``save_pretrained`` must copy it:
  ``copy_llm=True``); ``vision_feature_layer`` / ``vision_feature_select_strategy`` become
  ``select_layer`` / ``select_feature``; the chat template comes along.
- an **original LLaVA-1.5 projector checkpoint** (``mm_projector.bin`` from LLaVA's pretraining stage,
  with LLaVA's ``config.json`` beside it): the tower (``mm_vision_tower``) and the LLM (``_name_or_path``)
  it names load by path or id like any mm_llama part, and the projector weights are read. The ``.bin`` is
  a pickle: read only when the user allows it, and then with ``torch.load(weights_only=True)``.

Out (:func:`export_llava_hf`, ``mm-llama export --format llava-hf``): an image model with an ``hf_vision``
encoder and a ``linear`` or ``mlp2x_gelu`` projector becomes a folder that plain
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` load: the LLM in
full precision with its LoRA merged, ``<image>`` in the vocabulary and the embeddings resized to it, a
``LlavaProcessor`` that expands ``<image>`` to the encoder's token count (and pads images to a square
first for ``aspect: pad``), and the chat template (with the
model's system prompt) accepting both plain-string and list-of-parts message contents. This is the layout
vLLM serves.
"""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mm_llama.config import (
    Dtype,
    EncoderConfig,
    LLMConfig,
    ModalityConfig,
    ModelConfig,
    ProjectorConfig,
    build_options,
)
from mm_llama.encoders.image import HFVisionEncoder, HFVisionOptions
from mm_llama.errors import MissingInputError, MMInputError
from mm_llama.hub import load_pretrained
from mm_llama.llm import DTYPES, load_llm
from mm_llama.modality import marker
from mm_llama.model import MultimodalLM
from mm_llama.model_io import _load_strict, _read_safetensors
from mm_llama.projectors.mlp import MLPOptions

IMAGE_TOKEN = marker("image")
LLAVA_CONFIG = "config.json"
PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")
"""The projector file looked for in a LLaVA-1.5 folder, in this order (LLaVA itself writes the ``.bin``)."""
PROJECTOR_PREFIX = "model.mm_projector."
PROJECTOR_KEYS: dict[str, dict[str, str]] = {
    "mlp2x_gelu": {
        "0.weight": "linear_1.weight",
        "0.bias": "linear_1.bias",
        "2.weight": "linear_2.weight",
        "2.bias": "linear_2.bias",
    },
    "linear": {"weight": "proj.weight", "bias": "proj.bias"},
}
"""LLaVA's ``mm_projector`` keys (after ``model.mm_projector.``) -> mm_llama's projector keys, per type."""
EXPORT_PROJECTORS = ("linear", "mlp2x_gelu")
ContentFormat = Literal["string", "parts"]


class LlavaImportError(MMInputError):
    """A LLaVA checkpoint that cannot be imported: names the file or field, what is supported, what was found."""


class LlavaExportError(MMInputError):
    """A model the llava-hf format cannot hold: names the part, what is supported and what the model has."""


# ---- chat templates -------------------------------------------------------------------------------------
TO_PARTS = (
    "{%- set _mm = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set _p = namespace(parts=[]) -%}"
    "{%- for piece in m['content'].split('" + IMAGE_TOKEN + "') -%}"
    "{%- if not loop.first -%}{%- set _p.parts = _p.parts + [{'type': 'image'}] -%}{%- endif -%}"
    "{%- if piece.strip() -%}{%- set _p.parts = _p.parts + [{'type': 'text', 'text': piece.strip()}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _mm.messages = _mm.messages + [{'role': m['role'], 'content': _p.parts}] -%}"
    "{%- else -%}{%- set _mm.messages = _mm.messages + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _mm.messages -%}"
)
"""Jinja prelude: string contents become LLaVA-style parts (``<image>`` -> an image part, the text between
markers -> stripped text parts), for a template that reads only parts."""
TO_STRING = (
    "{%- set _mm = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set _mm.messages = _mm.messages + [m] -%}"
    "{%- else -%}"
    "{%- set _t = namespace(pieces=[]) -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set _t.pieces = _t.pieces + ['" + IMAGE_TOKEN + "'] -%}"
    "{%- elif part['type'] == 'text' -%}{%- set _t.pieces = _t.pieces + [part['text']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _mm.messages = _mm.messages + [{'role': m['role'], 'content': _t.pieces | join('\\n')}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _mm.messages -%}"
)
"""Jinja prelude: list-of-parts contents (transformers' and vLLM's chat format) become strings with
``<image>`` markers (parts joined by newlines, as ``with_markers`` writes them), for a string template."""
_PROBE = "mm-llama-probe"


def content_formats(template: str, tokenizer: PreTrainedTokenizerBase) -> set[ContentFormat]:
    """Which message content forms ``template`` renders: a string with an ``<image>`` marker, and/or a
    list of parts (``{"type": "image"}``, ``{"type": "text", ...}``); judged by rendering a probe of each."""
    probes: dict[ContentFormat, Any] = {
        "string": f"{IMAGE_TOKEN}\n{_PROBE}",
        "parts": [{"type": "image"}, {"type": "text", "text": _PROBE}],
    }
    found: set[ContentFormat] = set()
    for name, content in probes.items():
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], chat_template=template, tokenize=False
            )
        except Exception:  # noqa: BLE001 (jinja raises many types for a content form the template cannot read)
            continue
        if text.count(IMAGE_TOKEN) == 1 and _PROBE in text and "'type'" not in text:
            found.add(name)
    return found


def _dual_template(
    template: str, tokenizer: PreTrainedTokenizerBase, where: str, error: type[MMInputError]
) -> str:
    """``template``, made to render both content forms (a prelude converts the one it lacks)."""
    formats = content_formats(template, tokenizer)
    if formats == {"string", "parts"}:
        return template
    if formats == {"parts"}:
        return TO_PARTS + template
    if formats == {"string"}:
        return TO_STRING + template
    raise error(
        f"{where}: its chat template renders neither a message whose content is a string with an "
        f"{IMAGE_TOKEN} marker nor one made of image and text parts, each with exactly one {IMAGE_TOKEN}"
    )


def _with_system_prompt(template: str, system_prompt: str | None) -> str:
    """``template`` that starts a conversation without a system message with ``system_prompt``."""
    if system_prompt is None:
        return template
    literal = json.dumps(system_prompt)  # a JSON string is a valid Jinja string literal
    return (
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages -%}"
        "{%- endif -%}" + template
    )


# ---- import ---------------------------------------------------------------------------------------------
def from_llava(
    path: str | Path,
    llm: str | None = None,
    vision_tower: str | None = None,
    allow_pickle: bool = False,
    dtype: Dtype = "float32",
) -> MultimodalLM:
    """A :class:`MultimodalLM` from a llava-hf folder, or from a LLaVA-1.5 projector checkpoint (its folder
    or its ``mm_projector.bin`` / ``.safetensors``). For the latter, ``llm`` and ``vision_tower`` (a path
    or id) replace what its ``config.json`` names, and ``allow_pickle`` lets a ``.bin`` be read (with
    ``torch.load(weights_only=True)``). ``dtype`` is the LLM's; encoder and projector load in float32."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"import-llava: {path} not found")
    folder, file = (path.parent, path) if path.is_file() else (path, None)
    config_file = folder / LLAVA_CONFIG
    raw = _read_json(config_file) if config_file.is_file() else {}
    if raw.get("model_type") == "llava":
        if file is not None or llm is not None or vision_tower is not None:
            raise LlavaImportError(
                f"{folder} is a llava-hf folder (model_type llava in its {LLAVA_CONFIG}): give the folder "
                "alone; it holds its own LLM and vision tower (llm / vision_tower apply to LLaVA-1.5 "
                "projector checkpoints)"
            )
        return _from_llava_hf(folder, dtype)
    return _from_projector(folder, file, raw, llm, vision_tower, allow_pickle, dtype)


def import_llava(
    source: str | Path,
    out: str | Path,
    llm: str | None = None,
    vision_tower: str | None = None,
    allow_pickle: bool = False,
    dtype: Dtype = "float32",
) -> Path:
    """:func:`from_llava`, saved as an mm_llama checkpoint in ``out``. A llava-hf LLM is written to
    ``out/llm`` (it has no other source to name); a LLaVA-1.5 projector's LLM is referenced by its id or path."""
    model = from_llava(source, llm=llm, vision_tower=vision_tower, allow_pickle=allow_pickle, dtype=dtype)
    return model.save_pretrained(out, copy_llm=model.config.llm.from_config is not None)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaImportError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise LlavaImportError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _from_llava_hf(folder: Path, dtype: Dtype) -> MultimodalLM:
    """See the module docstring. The LLM's modules are reused as loaded (no copy of its weights)."""
    try:
        processor = load_pretrained(str(folder), "llava-hf processor", AutoProcessor.from_pretrained)
    except (OSError, ValueError) as e:  # transformers' errors for a folder without (readable) processor files
        raise LlavaImportError(f"{folder}: no LlavaProcessor could be loaded from it ({e})") from e
    if not isinstance(processor, LlavaProcessor):
        raise LlavaImportError(
            f"{folder}: expected a LlavaProcessor saved beside the model (processor_config.json, the "
            f"tokenizer and preprocessor_config.json), found {type(processor).__name__}"
        )
    if processor.image_token != IMAGE_TOKEN:
        raise LlavaImportError(
            f"{folder}: its processor's image token is {processor.image_token!r}; mm_llama's image marker "
            f"is {IMAGE_TOKEN!r}"
        )
    llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=DTYPES[dtype])
    config = llava.config
    where = folder / LLAVA_CONFIG
    if not isinstance(config.vision_feature_layer, int):
        raise LlavaImportError(
            f"{where}: vision_feature_layer is {config.vision_feature_layer!r}; one layer (an int) is "
            "supported, not a list of layers"
        )
    projector_type = {"gelu": "mlp2x_gelu", "linear": "linear"}.get(config.projector_hidden_act)
    if projector_type is None:
        raise LlavaImportError(
            f"{where}: projector_hidden_act is {config.projector_hidden_act!r}; supported: 'gelu' "
            "(mlp2x_gelu) and 'linear' (a linear projector)"
        )
    tower = llava.model.vision_tower.float()
    embeddings = getattr(tower, "vision_model", tower).embeddings
    has_cls = int(embeddings.num_positions) > int(embeddings.num_patches)
    strategy = config.vision_feature_select_strategy
    if strategy == "default" and not has_cls:
        raise LlavaImportError(
            f"{where}: vision_feature_select_strategy 'default' drops the first token, but the "
            f"{type(tower).__name__} tower has no CLS token; use 'full'"
        )
    tower_config = _config_dict(tower.config)
    encoder = EncoderConfig(
        type="hf_vision",
        options={
            "config": tower_config,
            "select_layer": config.vision_feature_layer,
            "select_feature": "patch" if strategy == "default" or not has_cls else "cls_patch",
            "image_processor": json.loads(processor.image_processor.to_json_string()),
        },
        freeze=True,
    )
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = processor.chat_template or tokenizer.chat_template
    if template is not None:
        tokenizer.chat_template = _dual_template(template, tokenizer, str(folder), LlavaImportError)
    text_config = llava.config.text_config
    model_config = ModelConfig(
        llm=LLMConfig(name_or_path=str(folder), dtype=dtype, from_config=_config_dict(text_config)),
        modalities={"image": ModalityConfig(encoder=encoder, projector=ProjectorConfig(type=projector_type))},
    )
    model = MultimodalLM(model_config, llm=_causal_lm(llava), tokenizer=tokenizer)
    model.encoders["image"].tower = tower
    hf = llava.model.multi_modal_projector.float()
    state = _projector_state(hf, projector_type)
    _load_strict(model.projectors["image"], state, folder, "the image projector")
    return model.eval()


def _config_dict(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.to_diff_dict().items() if k not in ("transformers_version", "dtype")}


def _causal_lm(llava: LlavaForConditionalGeneration) -> PreTrainedModel:
    """The llava model's LLM as a causal LM: an empty shell (meta device) around its own modules."""
    text_config = llava.config.text_config
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text_config)
    setattr(llm, llm.base_model_prefix, llava.model.language_model)
    llm.set_output_embeddings(llava.lm_head)
    llm.generation_config = llava.generation_config
    _check_no_meta(llm, "the imported LLM")
    return llm.eval()


def _projector_state(hf: nn.Module, projector_type: str) -> dict[str, torch.Tensor]:
    """transformers' Llava projector (``linear_1`` -> act -> ``linear_2``) as mm_llama projector weights;
    with the linear activation the two layers fold into one: W = W2 W1, b = W2 b1 + b2."""
    w1, w2 = hf.linear_1.weight.detach(), hf.linear_2.weight.detach()
    b1 = hf.linear_1.bias.detach() if hf.linear_1.bias is not None else torch.zeros(w1.shape[0])
    b2 = hf.linear_2.bias.detach() if hf.linear_2.bias is not None else torch.zeros(w2.shape[0])
    if projector_type == "linear":
        return {"proj.weight": w2 @ w1, "proj.bias": w2 @ b1 + b2}
    return {"linear_1.weight": w1, "linear_1.bias": b1, "linear_2.weight": w2, "linear_2.bias": b2}


def _from_projector(
    folder: Path,
    file: Path | None,
    raw: dict[str, Any],
    llm: str | None,
    vision_tower: str | None,
    allow_pickle: bool,
    dtype: Dtype,
) -> MultimodalLM:
    """See the module docstring: every field is checked and the weights read before any model loads."""
    where = folder / LLAVA_CONFIG
    if file is None:
        file = next((folder / name for name in PROJECTOR_FILES if (folder / name).is_file()), None)
        if file is None:
            raise LlavaImportError(
                f"{folder}: neither a llava-hf folder (no {LLAVA_CONFIG} with model_type llava) nor a LLaVA-1.5 "
                f"projector checkpoint (no {' or '.join(PROJECTOR_FILES)})"
            )
    if raw.get("mm_use_im_start_end"):
        raise LlavaImportError(
            f"{where}: mm_use_im_start_end is true (image start/end tokens around the features); mm_llama "
            "places the features alone, as LLaVA-1.5 does (false)"
        )
    if raw.get("mm_patch_merge_type", "flat") != "flat":
        raise LlavaImportError(
            f"{where}: mm_patch_merge_type is {raw['mm_patch_merge_type']!r} (LLaVA-NeXT's tiling); "
            "supported: 'flat' (LLaVA-1.5)"
        )
    state = _read_projector(file, allow_pickle)
    projector_type = raw.get("mm_projector_type") or _projector_type_of(state.keys())
    if projector_type not in PROJECTOR_KEYS:
        raise LlavaImportError(
            f"{where}: mm_projector_type {projector_type!r} is not supported; supported: "
            f"{', '.join(PROJECTOR_KEYS)}"
        )
    expected = {PROJECTOR_PREFIX + k for k in PROJECTOR_KEYS[projector_type]}
    if set(state) != expected:
        raise LlavaImportError(
            f"{file}: expected the keys of a {projector_type} projector, {sorted(expected)}; found "
            f"{sorted(state)[:8]}{' ...' if len(state) > 8 else ''}"
        )
    tower = vision_tower or raw.get("mm_vision_tower") or raw.get("vision_tower")
    if not isinstance(tower, str):
        raise LlavaImportError(
            f"{where}: mm_vision_tower names no vision tower (found {tower!r}); give one with "
            "vision_tower= (--vision-tower PATH_OR_ID)"
        )
    llm_name = llm or raw.get("_name_or_path")
    if not isinstance(llm_name, str) or not llm_name:
        raise LlavaImportError(
            f"{where}: _name_or_path names no LLM (found {llm_name!r}); give one with llm= (--llm PATH_OR_ID)"
        )
    options = {
        "name_or_path": tower,
        "select_layer": raw.get("mm_vision_select_layer", -2),
        "select_feature": raw.get("mm_vision_select_feature", "patch"),
        "aspect": "pad" if raw.get("image_aspect_ratio") == "pad" else "crop",
    }
    try:
        build_options(HFVisionOptions, options, f"{where} (mm_vision_*)")
    except MMInputError as e:
        raise LlavaImportError(str(e)) from e
    config = ModelConfig(
        llm=LLMConfig(name_or_path=llm_name, dtype=dtype),
        modalities={
            "image": ModalityConfig(
                encoder=EncoderConfig(type="hf_vision", options=options),
                projector=ProjectorConfig(type=projector_type),
            )
        },
        chat_template="vicuna_v1",  # the conversation LLaVA-1.5 was trained with (conv_vicuna_v1)
    )
    model = MultimodalLM(config)
    mapping = PROJECTOR_KEYS[projector_type]
    weights = {mapping[k[len(PROJECTOR_PREFIX) :]]: v.float() for k, v in state.items()}
    _load_strict(model.projectors["image"], weights, file, f"the {projector_type} projector")
    return model.eval()


def _projector_type_of(keys: Any) -> str:
    """The projector type whose LLaVA keys these are (LLaVA's own default, ``linear``, when none fits)."""
    names = {k[len(PROJECTOR_PREFIX) :] for k in keys if k.startswith(PROJECTOR_PREFIX)}
    return next((t for t, mapping in PROJECTOR_KEYS.items() if set(mapping) == names), "linear")


def _read_projector(file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A projector file's tensors: safetensors as is; a pickle only with ``allow_pickle`` (weights only)."""
    if file.suffix == ".safetensors":
        return _read_safetensors(file)
    if not allow_pickle:
        raise LlavaImportError(
            f"{file} is a pickle file, which can run code when read; pass allow_pickle=True "
            "(--allow-pickle) to read it with torch.load(weights_only=True), or convert it to "
            "mm_projector.safetensors"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise LlavaImportError(f"{file}: not a readable torch weights file ({str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LlavaImportError(
            f"{file}: expected a mapping of names to tensors, found {type(state).__name__}"
        )
    return state


# ---- export ---------------------------------------------------------------------------------------------
def check_exportable(config: ModelConfig, where: str = "model") -> None:
    """Raise :class:`LlavaExportError` unless the llava-hf format can hold a model of this config: one
    ``image`` modality, an ``hf_vision`` encoder, a ``linear`` or ``mlp2x_gelu`` projector (one token per
    feature), the ``chat`` template. Reads no weights (the CLI checks before loading the model)."""
    names = list(config.modalities)
    if names != ["image"]:
        raise LlavaExportError(
            f"{where}: the llava-hf format holds one modality, image; this model has {', '.join(names) or 'none'}"
        )
    spec = config.modalities["image"]
    if spec.encoder.type != "hf_vision":
        raise LlavaExportError(
            f"{where}: modalities.image.encoder.type is {spec.encoder.type!r}; the llava-hf format takes an "
            "hf_vision encoder (a transformers vision tower such as CLIPVisionModel)"
        )
    if spec.projector.type not in EXPORT_PROJECTORS:
        raise LlavaExportError(
            f"{where}: modalities.image.projector.type is {spec.projector.type!r}; the llava-hf format takes "
            f"{' or '.join(EXPORT_PROJECTORS)}"
        )
    if spec.projector.type == "mlp2x_gelu":
        options = build_options(MLPOptions, spec.projector.options, "modalities.image.projector.options")
        if options.tokens_per_feature != 1:
            raise LlavaExportError(
                f"{where}: modalities.image.projector.options.tokens_per_feature is "
                f"{options.tokens_per_feature}; the llava-hf projector writes 1 token per feature"
            )
    if config.template != "chat":
        raise LlavaExportError(
            f"{where}: template is {config.template!r} (LLaVA's stage-1 captions); the llava-hf export needs "
            "a chat model (template: chat)"
        )


def export_llava_hf(model: MultimodalLM, out: str | Path) -> Path:
    """Write ``model`` as a llava-hf folder (see the module docstring) into ``out``. The model's vision
    tower, projector and LLM modules are saved as they are; a LoRA adapter is merged first, like
    ``save_pretrained(copy_llm=True)`` does (in place for an unquantized LLM, into a full-precision reload
    of the base for a 4-bit one). The model's tokenizer and embeddings are left as they were."""
    check_exportable(model.config)
    out = Path(out)
    encoder: HFVisionEncoder = model.encoders["image"]
    image_processor = _hf_image_processor(encoder)
    tokenizer = copy.deepcopy(model.tokenizer)
    template = _dual_template(tokenizer.chat_template, tokenizer, "the model's tokenizer", LlavaExportError)
    tokenizer.chat_template = _with_system_prompt(template, model.config.system_prompt)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    llm = _full_precision_llm(model)
    text_config = copy.deepcopy(llm.config)
    embed, head = _resized_embeddings(llm, len(tokenizer), text_config)
    decoder = copy.copy(llm.get_decoder())  # its own child table: new embeddings without touching the model's
    decoder._modules = dict(decoder._modules)
    decoder.set_input_embeddings(embed)
    decoder.config = text_config

    has_cls = encoder.preprocessor.has_cls
    keep_cls = encoder.options.select_feature == "cls_patch"
    strategy = "default" if has_cls and not keep_cls else "full"
    linear_1, linear_2, act = _hf_projector(model.projectors["image"], model.config)
    config = LlavaConfig(
        vision_config=copy.deepcopy(encoder.tower.config),
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=encoder.preprocessor.num_patches + int(keep_cls),
        projector_hidden_act=act,
        vision_feature_layer=encoder.options.select_layer,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = encoder.tower
    llava.model.language_model = decoder
    llava.model.multi_modal_projector.linear_1 = linear_1
    llava.model.multi_modal_projector.linear_2 = linear_2
    llava.lm_head = head
    llava.generation_config = copy.deepcopy(llm.generation_config)
    _check_no_meta(llava, "the llava-hf model")
    llava.save_pretrained(out)
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(encoder.tower.config.patch_size),
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(has_cls),
        chat_template=tokenizer.chat_template,
    ).save_pretrained(out)
    return out


def _hf_image_processor(encoder: HFVisionEncoder) -> Any:
    """The encoder's image processor; with ``aspect: pad``, as a ``LlavaImageProcessor`` that pads to a
    square first (LLaVA-1.5's ``expand2square``, as the encoder does), which needs CLIP's processor."""
    processor = encoder.preprocessor.image_processor
    if encoder.options.aspect == "crop":
        return processor
    if not isinstance(processor, CLIPImageProcessor):
        raise LlavaExportError(
            f"modalities.image.encoder.options.aspect is 'pad': the llava-hf export pads with "
            f"LlavaImageProcessor, which takes CLIPImageProcessor settings; this encoder's processor is a "
            f"{type(processor).__name__} (use aspect: crop)"
        )
    settings = json.loads(processor.to_json_string())
    return LlavaImageProcessor.from_dict(
        {**settings, "image_processor_type": "LlavaImageProcessor", "do_pad": True}
    )


def _full_precision_llm(model: MultimodalLM) -> PreTrainedModel:
    """The model's LLM with any LoRA merged, never 4-bit (a quantized base is reloaded in float32)."""
    cfg = model.config.llm
    if cfg.quantization != "none" and cfg.from_config is not None:
        raise LlavaExportError(
            "llm: a 4-bit LLM built from llm.from_config has no full-precision weights to reload; export "
            "an LLM loaded from a path or id"
        )
    if hasattr(model.llm, "merge_and_unload"):
        if cfg.quantization != "none":
            return model._merged_full_precision()
        model.llm = model.llm.merge_and_unload()
        return model.llm
    if cfg.quantization != "none":
        return load_llm(replace(cfg, quantization="none", dtype="float32", adapter=None))
    return model.llm


def _resized_embeddings(llm: PreTrainedModel, vocab: int, text_config: Any) -> tuple[nn.Embedding, nn.Linear]:
    """Input embeddings and LM head with at least ``vocab`` rows, as new modules when rows are added (the
    mean of the existing rows, as transformers' ``resize_token_embeddings`` does); ``text_config`` gets the
    new size. A tied head shares the new embedding matrix."""
    embed, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    old = embed.weight.shape[0]
    if vocab <= old:
        return embed, head
    extra = vocab - old

    def grown(weight: torch.Tensor) -> nn.Parameter:
        mean = weight.detach().mean(0, keepdim=True).expand(extra, -1)
        return nn.Parameter(torch.cat([weight.detach(), mean]), requires_grad=False)

    new_embed = nn.Embedding(vocab, embed.embedding_dim, padding_idx=embed.padding_idx, device="meta")
    new_embed.weight = grown(embed.weight)
    new_head = nn.Linear(head.in_features, vocab, bias=False, device="meta")
    new_head.weight = new_embed.weight if text_config.tie_word_embeddings else grown(head.weight)
    text_config.vocab_size = vocab
    return new_embed, new_head


def _hf_projector(projector: nn.Module, config: ModelConfig) -> tuple[nn.Linear, nn.Linear, str]:
    """transformers' Llava projector layers for an mm_llama one: ``mlp2x_gelu`` as it is; ``linear`` as
    its layer, the linear activation and an identity layer (transformers' projector always has two)."""
    if config.modalities["image"].projector.type == "mlp2x_gelu":
        return projector.linear_1, projector.linear_2, "gelu"
    proj = projector.proj
    identity = nn.Linear(proj.out_features, proj.out_features, dtype=proj.weight.dtype)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(proj.out_features, dtype=proj.weight.dtype))
        identity.bias.zero_()
    return proj, identity, "linear"


def _check_no_meta(module: nn.Module, what: str) -> None:
    """Fail loudly if assembling ``module`` left a weight unset (a bug here, not the user's)."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left without values: {left[:5]}")
