"""MultimodalLM against transformers' LlavaForConditionalGeneration with the same weights."""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from mm_llama import MultimodalLM
from tests.conftest import tiny_config


def test_parity_with_hf_llava(rgb_image) -> None:
    torch.manual_seed(0)
    config = tiny_config()
    config.llm.from_config["vocab_size"] = 49153  # HF Llava embeds the image token id itself
    model = MultimodalLM(config).eval()
    encoder, projector = model.encoders["image"], model.projectors["image"]

    llava_config = LlavaConfig(
        vision_config=encoder.tower.config,
        text_config=model.llm.config,
        image_token_id=model.processor.placeholder_ids["image"],
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    llava = LlavaForConditionalGeneration(llava_config).eval()
    llava.model.vision_tower.load_state_dict(encoder.tower.state_dict())
    llava.model.multi_modal_projector.load_state_dict(projector.state_dict())
    llava.model.language_model.load_state_dict(model.llm.model.state_dict())
    llava.lm_head.load_state_dict(model.llm.lm_head.state_dict())

    example = model.processor("Describe <image> in one word, please.", {"image": [rgb_image]})
    batch = model.processor.collate([example])
    with torch.no_grad():
        ours = model(
            batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True
        ).logits
        theirs = llava(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=torch.stack(batch["media"]["image"]),
        ).logits
    assert ours.shape == theirs.shape == (1, len(example.input_ids), 49153)
    assert (ours - theirs).abs().max().item() <= 1e-4
