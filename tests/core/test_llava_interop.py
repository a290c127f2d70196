"""LLaVA checkpoints in (llava-hf folders, LLaVA-1.5 projectors) and llava-hf out, checked against
transformers' own Llava and a hand-assembled LLaVA-1.5 forward pass."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from mm_llama import EncoderConfig, LLMConfig, ModelConfig, MultimodalLM
from mm_llama.cli import main
from mm_llama.config import ModalityConfig, save_config
from mm_llama.encoders.base import build_preprocessor
from mm_llama.errors import MMInputError
from mm_llama.interop.llava import (
    LlavaExportError,
    LlavaImportError,
    check_exportable,
    export_llava_hf,
    from_llava,
)
from mm_llama.llm import load_tokenizer
from mm_llama.processor import MODEL_CONFIG_FILE, Example
from tests.conftest import TINY_CLIP, TINY_LLAMA, tiny_config, tiny_image_modality

LLAVA_15_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf's processor template: message contents are lists of parts
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QUESTION = "What is shown?"
PARTS = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(**{k: v for k, v in TINY_CLIP.items() if k != "model_type"})


def image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """40 x 50: not square, so LLaVA-1.5's padding shows."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8))


def logits(model: MultimodalLM, example: Example) -> torch.Tensor:
    batch = model.processor.collate([example])
    with torch.no_grad():
        return model(
            batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True
        ).logits


# ---- llava-hf in ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny llava-hf folder: model + LlavaProcessor with llava-1.5-hf's list-of-parts template."""
    folder = tmp_path_factory.mktemp("llava-hf")
    tokenizer = load_tokenizer(LLMConfig())
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False
    )
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=vision_config(),
        text_config=LlamaConfig(**TINY_LLAMA, vocab_size=len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_15_TEMPLATE,
    ).save_pretrained(folder)
    return folder


def test_llava_hf_folder_imports_with_its_logits_and_saves(
    llava_hf_dir: Path, image: Image.Image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llava = LlavaForConditionalGeneration.from_pretrained(llava_hf_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_hf_dir)
    inputs = processor(
        images=image,
        text=processor.apply_chat_template(PARTS, add_generation_prompt=True),
        return_tensors="pt",
    )
    with torch.no_grad():
        theirs = llava(**inputs).logits

    model = MultimodalLM.from_llava(llava_hf_dir)
    example = model.processor(f"<image>\n{QUESTION}", {"image": [image]}, add_generation_prompt=True)
    assert example.input_ids == inputs["input_ids"][0].tolist()  # the template and the 16 image tokens
    assert torch.equal(example.media["image"][0], inputs["pixel_values"][0])
    assert (logits(model, example) - theirs).abs().max().item() <= 1e-4
    image_options = model.config.modalities["image"].encoder
    assert (image_options.options["select_layer"], image_options.options["select_feature"]) == (-2, "patch")

    main(["import-llava", str(llava_hf_dir), "--out", str(tmp_path / "ck")])
    assert "wrote" in capsys.readouterr().out
    loaded = MultimodalLM.from_pretrained(tmp_path / "ck")
    assert loaded.config.modalities["image"].encoder.freeze is True
    assert (logits(loaded, example) - theirs).abs().max().item() <= 1e-4


# ---- LLaVA-1.5 projector in -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaVA-1.5's pretraining output (config.json + mm_projector.bin) naming a saved tower and LLM."""
    root = tmp_path_factory.mktemp("llava15")
    torch.manual_seed(0)
    CLIPVisionModel(vision_config()).save_pretrained(root / "tower")
    image_processor().save_pretrained(root / "tower")
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=49152)).save_pretrained(root / "llm")
    load_tokenizer(LLMConfig()).save_pretrained(root / "llm")
    folder = root / "projector"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "_name_or_path": str(root / "llm"),
                "mm_vision_tower": str(root / "tower"),
                "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -2,
                "mm_vision_select_feature": "patch",
                "mm_use_im_start_end": False,
                "image_aspect_ratio": "pad",
            }
        )
    )
    weights = {f"model.mm_projector.{i}.{p}": torch.randn(32, 32) * 0.3 for i in (0, 2) for p in ("weight",)}
    weights |= {f"model.mm_projector.{i}.bias": torch.randn(32) * 0.3 for i in (0, 2)}
    torch.save({k: v.half() for k, v in weights.items()}, folder / "mm_projector.bin")  # LLaVA saves fp16
    return folder


def llava15_reference(folder: Path, image: Image.Image, input_ids: list[int], image_id: int) -> torch.Tensor:
    """LLaVA-1.5's forward by hand: expand2square, CLIP's processor, hidden_states[-2] without CLS,
    mm_projector, features spliced in place of the image token."""
    root = folder.parent
    tower = CLIPVisionModel.from_pretrained(root / "tower").eval()
    processor = CLIPImageProcessor.from_pretrained(root / "tower")
    side = max(image.size)
    square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in processor.image_mean))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    pixels = processor(images=square, return_tensors="pt")["pixel_values"]
    mlp = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
    state = torch.load(folder / "mm_projector.bin", weights_only=True)
    mlp.load_state_dict({k.removeprefix("model.mm_projector."): v.float() for k, v in state.items()})
    llm = LlamaForCausalLM.from_pretrained(root / "llm").eval()
    ids = torch.tensor(input_ids)
    slots = (ids == image_id).nonzero().flatten()
    start, end = int(slots[0]), int(slots[-1]) + 1
    with torch.no_grad():
        features = mlp(tower(pixels, output_hidden_states=True).hidden_states[-2][0, 1:])  # (16, 32)
        embed = llm.get_input_embeddings()
        embeds = torch.cat([embed(ids[:start]), features, embed(ids[end:])])
        return llm(inputs_embeds=embeds[None]).logits


def test_llava15_projector_imports_with_llava_logits_and_saves(
    llava15_dir: Path, image: Image.Image, tmp_path: Path
) -> None:
    model = from_llava(llava15_dir / "mm_projector.bin", allow_pickle=True)
    spec = model.config.modalities["image"]
    assert (spec.projector.type, spec.encoder.options["aspect"]) == ("mlp2x_gelu", "pad")
    example = model.processor(f"<image>\n{QUESTION}", {"image": [image]}, add_generation_prompt=True)
    image_id = model.processor.placeholder_ids["image"]
    assert example.input_ids.count(image_id) == 16
    reference = llava15_reference(llava15_dir, image, example.input_ids, image_id)
    assert (logits(model, example) - reference).abs().max().item() <= 1e-4
    loaded = MultimodalLM.from_pretrained(model.save_pretrained(tmp_path / "ck"))
    assert loaded.config.llm.name_or_path == str(llava15_dir.parent / "llm")  # referenced, not copied
    assert (logits(loaded, example) - reference).abs().max().item() <= 1e-4


def projector_folder(tmp_path: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    tmp_path.mkdir()
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(weights, tmp_path / "mm_projector.safetensors")
    return tmp_path


def test_bad_llava_inputs_are_refused_by_name(
    llava15_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(LlavaImportError, match=r"mm_projector.bin is a pickle.*--allow-pickle"):
        from_llava(llava15_dir)
    with pytest.raises(SystemExit) as stop:
        main(["import-llava", str(llava15_dir), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "--allow-pickle" in capsys.readouterr().err

    linear_keys = {
        "model.mm_projector.weight": torch.zeros(32, 32),
        "model.mm_projector.bias": torch.zeros(32),
    }
    names = {"mm_vision_tower": "t", "_name_or_path": "l"}
    wrong = projector_folder(tmp_path / "wrong", {**names, "mm_projector_type": "mlp2x_gelu"}, linear_keys)
    with pytest.raises(
        LlavaImportError, match=r"expected the keys of a mlp2x_gelu projector.*found \['model"
    ):
        from_llava(wrong)
    unknown = projector_folder(
        tmp_path / "unknown", {**names, "mm_projector_type": "mlp3x_gelu"}, linear_keys
    )
    with pytest.raises(
        LlavaImportError, match=r"mm_projector_type 'mlp3x_gelu' is not supported; supported: "
    ):
        from_llava(unknown)
    nameless = projector_folder(tmp_path / "nameless", {"_name_or_path": "l"}, linear_keys)
    with pytest.raises(LlavaImportError, match=r"mm_vision_tower names no vision tower.*--vision-tower"):
        from_llava(nameless)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlavaImportError, match="neither a llava-hf folder"):
        from_llava(tmp_path / "empty")


def test_export_refuses_what_llava_hf_cannot_hold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cnn = tiny_config()
    cnn.modalities["image"] = ModalityConfig(encoder=EncoderConfig(type="image_cnn"))
    with pytest.raises(LlavaExportError, match=r"modalities.image.encoder.type is 'image_cnn'.*hf_vision"):
        check_exportable(cnn)
    resampler = tiny_config()
    resampler.modalities["image"] = tiny_image_modality("resampler")
    with pytest.raises(LlavaExportError, match=r"projector.type is 'resampler'.*linear or mlp2x_gelu"):
        check_exportable(resampler)
    two = tiny_config()
    two.modalities["video"] = copy.deepcopy(two.modalities["image"])
    with pytest.raises(LlavaExportError, match="holds one modality, image; this model has image, video"):
        check_exportable(two)
    plain = tiny_config(template="plain")
    with pytest.raises(LlavaExportError, match="template is 'plain'"):
        check_exportable(plain)
    tmp_path.joinpath("ck").mkdir()
    save_config(cnn, tmp_path / "ck" / MODEL_CONFIG_FILE)  # refused from the config, before any weights load
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "export",
                "--format",
                "llava-hf",
                "--checkpoint",
                str(tmp_path / "ck"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert stop.value.code == 2 and "image_cnn" in capsys.readouterr().err


# ---- llava-hf out ---------------------------------------------------------------------------------------
def hf_inputs(folder: Path, image: Image.Image) -> tuple[LlavaForConditionalGeneration, dict]:
    """The exported folder loaded by plain transformers, and its processor's inputs for ``PARTS``."""
    llava = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(PARTS, add_generation_prompt=True)
    return llava, processor(images=image, text=text, return_tensors="pt")


def test_linear_padded_model_exports_from_the_cli_and_imports_back(
    image: Image.Image, tmp_path: Path
) -> None:
    """A ``linear`` projector (an identity second layer in llava-hf), LLaVA-1.5's padding, an untied head."""
    torch.manual_seed(0)
    config = tiny_config()
    config.modalities["image"] = tiny_image_modality("linear", aspect="pad", select_layer=-1)
    model = MultimodalLM(config).eval()
    example = model.processor(f"<image>\n{QUESTION}", {"image": [image]}, add_generation_prompt=True)
    ours = logits(model, example)
    checkpoint, out = model.save_pretrained(tmp_path / "ck", copy_llm=True), tmp_path / "hf"
    main(["export", "--format", "llava-hf", "--checkpoint", str(checkpoint), "--out", str(out)])

    llava, inputs = hf_inputs(out, image)
    assert (llava.config.projector_hidden_act, llava.config.vision_feature_layer) == ("linear", -1)
    assert inputs["input_ids"][0].tolist() == example.input_ids
    assert torch.equal(inputs["pixel_values"][0], example.media["image"][0])  # padded the same way
    with torch.no_grad():
        theirs = llava(**inputs).logits
    assert (theirs[..., : ours.shape[-1]] - ours).abs().max().item() <= 1e-4

    back = from_llava(out)  # and in again: the two linear layers fold into one
    assert back.config.modalities["image"].projector.type == "linear"
    assert (logits(back, example)[..., : ours.shape[-1]] - ours).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_export_to_llava_hf_loads_in_plain_transformers(image: Image.Image, tmp_path: Path) -> None:
    """The real SmolLM2 with a LoRA (random, so merging matters), a random tiny CLIP tower, mlp2x_gelu."""
    torch.manual_seed(0)
    config = ModelConfig(
        llm=LLMConfig(name_or_path="smollm2-135m"),
        modalities={"image": tiny_image_modality("mlp2x_gelu")},
        system_prompt="Answer in one word.",
    )
    model = MultimodalLM(config).eval()
    model.llm = get_peft_model(
        model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    example = model.processor(f"<image>\n{QUESTION}", {"image": [image]}, add_generation_prompt=True)
    ours = logits(model, example)
    answer = model.generate(f"<image>\n{QUESTION}", images=[image], max_new_tokens=6)
    vocab, template = ours.shape[-1], model.tokenizer.chat_template

    export_llava_hf(model, tmp_path / "hf")
    assert model.tokenizer.chat_template == template and len(model.tokenizer) == vocab + 1  # untouched
    merged = logits(model, example)  # the export merged the LoRA into this model's LLM, as copy_llm does
    assert not hasattr(model.llm, "peft_config")
    assert (merged - ours).abs().max().item() <= 1e-3  # merging only reorders float32 sums
    llava, inputs = hf_inputs(tmp_path / "hf", image)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    text = processor.apply_chat_template(PARTS, add_generation_prompt=True)
    as_string = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    assert processor.apply_chat_template(as_string, add_generation_prompt=True) == text
    assert "Answer in one word." in text  # the model's system prompt travels in the template
    assert inputs["input_ids"][0].tolist() == example.input_ids
    assert llava.config.text_config.vocab_size == vocab + 1  # <image> joined the vocabulary
    with torch.no_grad():
        theirs = llava(**inputs).logits
    assert (theirs[..., :vocab] - merged).abs().max().item() <= 1e-4
    generated = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
    start = inputs["input_ids"].shape[1]
    assert processor.decode(generated[0, start:], skip_special_tokens=True).strip() == answer.strip()


def test_hf_vision_image_processor_settings_must_name_a_class() -> None:
    options = {"config": TINY_CLIP, "image_processor": {"image_processor_type": "NoSuchImageProcessor"}}
    with pytest.raises(MMInputError, match="image_processor_type must name a transformers image processor"):
        build_preprocessor("image", EncoderConfig(type="hf_vision", options=options))
