"""MultimodalLM and its processor on tiny random models: shapes, labels, masks, errors, save/load, generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mm_llama import MultimodalLM
from mm_llama.errors import MMInputError
from mm_llama.processor import IGNORE_INDEX
from tests.conftest import tiny_config

N_IMAGE_TOKENS = 16  # 32 px / 8 px patches = 4 x 4, CLS dropped


def test_marker_expansion_and_labels(tiny_model: MultimodalLM, rgb_image: np.ndarray) -> None:
    conversation = [
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And <image>?"},
        {"from": "gpt", "value": "Blue."},
    ]
    example = tiny_model.processor(conversation, {"image": [rgb_image, rgb_image]})
    pid = tiny_model.processor.placeholder_ids["image"]
    assert example.input_ids.count(pid) == 2 * N_IMAGE_TOKENS
    assert len(example.media["image"]) == 2 and example.media["image"][0].shape == (3, 32, 32)
    supervised = [i for i, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tiny_model.tokenizer.decode(supervised) == "Red.<|im_end|>\nBlue.<|im_end|>\n"
    assert all(label == IGNORE_INDEX for i, label in zip(example.input_ids, example.labels) if i == pid)
    rendered = tiny_model.tokenizer.decode(example.input_ids)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_plain_template_supervises_caption_only(rgb_image: np.ndarray) -> None:
    model = MultimodalLM(tiny_config(template="plain"))
    example = model.processor(
        [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a cat"}], {"image": [rgb_image]}
    )
    # BOS first (as LLaVA's plain template has it: the media are not the attention-sink position)
    assert example.input_ids[0] == model.tokenizer.bos_token_id is not None
    placeholders = [model.processor.placeholder_ids["image"]] * N_IMAGE_TOKENS
    assert example.input_ids[1 : 1 + N_IMAGE_TOKENS] == placeholders
    supervised = [i for i, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert model.tokenizer.decode(supervised) == "a cat\n"  # LLaVA's plain separator
    assert len(example.input_ids) == 1 + N_IMAGE_TOKENS + len(supervised)


def test_fallback_template_without_chat_template(rgb_image: np.ndarray) -> None:
    from mm_llama.llm import load_tokenizer

    tokenizer = load_tokenizer(tiny_config().llm)
    tokenizer.chat_template = None
    model = MultimodalLM(tiny_config(system_prompt=None), tokenizer=tokenizer)
    example = model.processor(
        [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "yo"}],
        {"image": [rgb_image]},
    )
    text = model.tokenizer.decode(
        [i for i in example.input_ids if i != model.processor.placeholder_ids["image"]]
    )
    assert text.startswith("USER:  hi\nASSISTANT: yo")
    supervised = [i for i, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert model.tokenizer.decode(supervised) == " yo<|im_end|>\n"  # the space after "ASSISTANT:" starts it


def test_marker_count_mismatch_is_explained(tiny_model: MultimodalLM, rgb_image: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"2 <image> marker\(s\) in the text but 1 image input\(s\) given"):
        tiny_model.processor("<image> and <image>", {"image": [rgb_image]})
    with pytest.raises(ValueError, match="no audio encoder"):
        tiny_model.processor("<audio>", {"audio": [b"x"]})


def test_placeholder_feature_mismatch_raises(tiny_model: MultimodalLM, rgb_image: np.ndarray) -> None:
    batch = tiny_model.processor.collate([tiny_model.processor("<image> hi", {"image": [rgb_image]})])
    ids = batch["input_ids"].clone()
    ids[0, ids[0] == tiny_model.processor.placeholder_ids["image"]] = 5  # remove the placeholders
    with pytest.raises(
        ValueError, match=r"hold 0 <image> placeholder tokens but the 1 image input\(s\) produced 16"
    ):
        tiny_model(ids, batch["attention_mask"], media=batch["media"])


def test_forward_loss_matches_full_logits(tiny_model: MultimodalLM, rgb_image: np.ndarray) -> None:
    examples = [
        tiny_model.processor(
            [{"from": "human", "value": "<image> colour?"}, {"from": "gpt", "value": "red"}],
            {"image": [rgb_image]},
        ),
        tiny_model.processor(
            [{"from": "human", "value": "Say something long about <image>"}, {"from": "gpt", "value": "no"}],
            {"image": [rgb_image]},
        ),
    ]
    batch = tiny_model.processor.collate(examples)
    assert batch["attention_mask"][0].tolist()[-1] in (0, 1) and batch["input_ids"].shape[0] == 2
    out = tiny_model(**batch, return_logits=True)
    logits = out.logits[:, :-1]
    targets = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert torch.allclose(out.loss, reference, atol=1e-5)
    assert out.num_label_tokens == int((targets != IGNORE_INDEX).sum())


def test_encode_with_aux_and_recording_aux(tiny_model: MultimodalLM, rgb_image: np.ndarray) -> None:
    x = tiny_model.encoders["image"].preprocess(rgb_image)
    with torch.no_grad():
        features = tiny_model.encoders["image"](x[None])[0]  # (N, D_enc)
        items = [features, features[:4], features]  # two shapes: two groups, back in input order
        plain = tiny_model.encode("image", items, encoded=True)
        pairs = tiny_model.encode_with_aux("image", items, encoded=True)  # mlp2x_gelu: default hook, no aux
        assert [t.shape[0] for t in plain] == [N_IMAGE_TOKENS, 4, N_IMAGE_TOKENS]
        assert all(torch.equal(t, p) and a is None for t, (p, a) in zip(plain, pairs))
        conversation = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Red."}]
        batch = tiny_model.processor.collate([tiny_model.processor(conversation, {"image": [rgb_image]})] * 2)
        with tiny_model.recording_aux(["image"]) as record:
            out = tiny_model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
        assert [t.shape[0] for t, _ in record["image"]] == [N_IMAGE_TOKENS] * 2  # the forward pass's items
        with tiny_model.recording_aux(["audio"]) as other:
            again = tiny_model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
        assert other == {"audio": []} and torch.equal(out.loss, again.loss)
        tiny_model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
        assert len(record["image"]) == 2  # closed: nothing more is recorded


def test_right_padding_does_not_change_logits(tiny_model: MultimodalLM, rgb_image: np.ndarray) -> None:
    short = tiny_model.processor("<image> a", {"image": [rgb_image]})
    long = tiny_model.processor("<image> a much longer question than the first one", {"image": [rgb_image]})
    alone = tiny_model.processor.collate([short])
    both = tiny_model.processor.collate([short, long])
    with torch.no_grad():
        a = tiny_model(**alone, return_logits=True).logits[0]
        b = tiny_model(**both, return_logits=True).logits[0, : a.shape[0]]
    assert torch.allclose(a, b, atol=1e-5)


def test_image_inputs_of_every_kind(tiny_model: MultimodalLM, rgb_image: np.ndarray, tmp_path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(rgb_image).save(path)
    reference = tiny_model.encoders["image"].preprocess(rgb_image)
    for item in (
        str(path),
        path,
        path.read_bytes(),
        Image.open(path),
        torch.from_numpy(rgb_image).permute(2, 0, 1),
    ):
        assert torch.allclose(tiny_model.encoders["image"].preprocess(item), reference)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tiny_model.generate("<image>", images=[tmp_path / "missing.png"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(MMInputError, match=r"image .*bad\.png: not an image file that PIL can read") as error:
        tiny_model.generate("<image>", images=[tmp_path / "bad.png"])
    assert "BytesIO" not in str(error.value)
    with pytest.raises(MMInputError, match=f"image {tmp_path}: expected a file, found a folder"):
        tiny_model.generate("<image>", images=[tmp_path])
    Image.new("RGB", (30, 30)).save(tmp_path / "big.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "big.png").read_bytes()[:60])
    with pytest.raises(MMInputError, match=r"cut\.png: the file is damaged or truncated"):
        tiny_model.generate("<image>", images=[tmp_path / "cut.png"])


def test_the_pixel_limit_is_checked_from_the_header(
    tiny_model: MultimodalLM, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mm_llama.encoders.image import MAX_PIXELS_ENV

    Image.new("RGB", (300, 200)).save(tmp_path / "wide.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "50000")
    with pytest.raises(MMInputError, match=r"wide\.png: 300 x 200 pixels, more than the limit of 50,000"):
        tiny_model.generate("<image>", images=[tmp_path / "wide.png"])
    monkeypatch.setenv(MAX_PIXELS_ENV, "60000")
    assert isinstance(tiny_model.generate("<image>", images=[tmp_path / "wide.png"], max_new_tokens=2), str)


def test_generate_single_batched_and_streaming(tiny_model: MultimodalLM, rgb_image: np.ndarray) -> None:
    other = np.flipud(rgb_image).copy()
    one = tiny_model.generate("<image>\nWhat is it?", images=[rgb_image], max_new_tokens=6)
    two = tiny_model.generate("Compare <image> with <image>.", images=[rgb_image, other], max_new_tokens=6)
    batched = tiny_model.generate(
        ["<image>\nWhat is it?", "Compare <image> with <image>."],
        images=[[rgb_image], [rgb_image, other]],
        max_new_tokens=6,
    )
    assert isinstance(one, str) and batched == [one, two]
    pieces = list(
        tiny_model.generate("<image>\nWhat is it?", images=[rgb_image], max_new_tokens=6, stream=True)
    )
    assert "".join(pieces).strip() == one
    torch.manual_seed(1)
    sampled = tiny_model.generate(
        "<image>", images=[rgb_image], max_new_tokens=4, do_sample=True, temperature=1.5
    )
    assert isinstance(sampled, str)
    with pytest.raises(ValueError, match="one list per prompt"):
        tiny_model.generate(["<image>", "<image>"], images=[[rgb_image]])


def test_generate_continues_a_conversation(tiny_model: MultimodalLM, rgb_image: np.ndarray) -> None:
    conversation = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A striped flag."},
        {"role": "user", "content": "What colour is it?"},
    ]
    reply = tiny_model.generate(conversation, images=[rgb_image], max_new_tokens=6)
    batch = tiny_model.prepare([conversation], {"image": [[rgb_image]]})
    rendered = tiny_model.tokenizer.decode(batch["input_ids"][0])
    assert rendered.index("A striped flag.") < rendered.index("What colour is it?")  # the earlier turns
    with torch.no_grad():  # greedy decoding by hand from the same inputs gives the same reply
        embeds, mask, new = tiny_model.embed(batch["input_ids"], batch["media"]), batch["attention_mask"], []
        for _ in range(6):
            token = int(tiny_model.llm(inputs_embeds=embeds, attention_mask=mask).logits[0, -1].argmax())
            if token in tiny_model._eos_ids():
                break
            new.append(token)
            step = tiny_model.llm.get_input_embeddings()(torch.tensor([[token]]))
            embeds, mask = (
                torch.cat([embeds, step], 1),
                torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1),
            )
    assert tiny_model.tokenizer.decode(new, skip_special_tokens=True).strip() == reply
    llava_turns = [
        {"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]}
        for t in conversation
    ]
    batched = tiny_model.generate(
        [llava_turns, "<image>\nWhat is it?"], images=[[rgb_image], [rgb_image]], max_new_tokens=6
    )
    assert batched[0] == reply
    with pytest.raises(ValueError, match="must end with a user turn"):
        tiny_model.generate(conversation[:2], images=[rgb_image])


def test_fingerprint_follows_the_trained_weights(tiny_model: MultimodalLM, tmp_path) -> None:
    checkpoint = tiny_model.save_pretrained(tmp_path / "ckpt", copy_llm=True)
    loaded = MultimodalLM.from_pretrained(checkpoint)
    before = loaded.fingerprint()
    assert MultimodalLM.from_pretrained(checkpoint).fingerprint() == before  # the same checkpoint again
    with torch.no_grad():
        next(loaded.projectors["image"].parameters())[0, 0] += 1e-3
    assert loaded.fingerprint() != before


def test_text_only_prompt(tiny_model: MultimodalLM) -> None:
    assert isinstance(tiny_model.generate("Hello", max_new_tokens=3), str)


def test_save_load_round_trip_identical_logits(
    tiny_model: MultimodalLM, rgb_image: np.ndarray, tmp_path
) -> None:
    batch = tiny_model.processor.collate([tiny_model.processor("<image> hi", {"image": [rgb_image]})])
    with torch.no_grad():
        before = tiny_model(**batch, return_logits=True).logits
    tiny_model.save_pretrained(tmp_path / "ckpt", copy_llm=True)
    assert (tmp_path / "ckpt" / "projectors.safetensors").is_file()
    assert (tmp_path / "ckpt" / "encoders" / "image.safetensors").is_file()  # built from scratch: saved
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        after = loaded(**batch, return_logits=True).logits
    assert torch.equal(before, after)
    with pytest.raises(MMInputError, match="not an mm_llama checkpoint"):
        MultimodalLM.from_pretrained(tmp_path)


def test_random_llm_must_be_copied(tiny_model: MultimodalLM, tmp_path) -> None:
    tiny_model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="copy_llm=True"):
        MultimodalLM.from_pretrained(tmp_path / "ckpt")


def test_pretrained_encoder_is_frozen_and_referenced(tmp_path, rgb_image: np.ndarray) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from tests.conftest import TINY_CLIP

    spec = {k: v for k, v in TINY_CLIP.items() if k != "model_type"}
    CLIPVisionModel(CLIPVisionConfig(**spec)).save_pretrained(tmp_path / "clip")
    config = tiny_config()
    config.modalities["image"].encoder.options = {"name_or_path": str(tmp_path / "clip")}
    model = MultimodalLM(config)
    assert not any(p.requires_grad for p in model.encoders["image"].parameters())
    model.save_pretrained(tmp_path / "ckpt", copy_llm=True)
    assert not (
        tmp_path / "ckpt" / "encoders"
    ).exists()  # frozen pretrained encoders are referenced, not copied
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(
        loaded.encoders["image"].preprocess(rgb_image), model.encoders["image"].preprocess(rgb_image)
    )


def test_copy_llm_merges_lora_once(tiny_model: MultimodalLM, rgb_image: np.ndarray, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    tiny_model.llm = get_peft_model(
        tiny_model.llm, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    for name, param in tiny_model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # a non-zero update, so merging matters
    batch = tiny_model.processor.collate([tiny_model.processor("<image> hi", {"image": [rgb_image]})])
    with torch.no_grad():
        before = tiny_model(**batch, return_logits=True).logits
    tiny_model.save_pretrained(tmp_path / "ckpt", copy_llm=True)
    assert not (tmp_path / "ckpt" / "adapter").exists()  # merged into llm/, not applied a second time
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        after = loaded(**batch, return_logits=True).logits
    assert torch.allclose(before, after, atol=1e-5)
