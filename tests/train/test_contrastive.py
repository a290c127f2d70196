"""The contrastive encoder-pretraining objective (ImageBind-style) and its stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mm_llama.config import ProjectorConfig
from mm_llama.data.dataset import ConversationDataset
from mm_llama.projectors.words import caption_vocabulary, word_count_loss
from mm_llama.train import StepInfo, build_stage_model, train
from mm_llama.train.config import validate_train_config
from mm_llama.train.contrastive import ContrastiveAligner
from mm_llama.train.losses import _same_rows, caption_word_loss, word_match_loss
from mm_llama.train.stage import stage_replies
from tests.train.conftest import align_stage, tiny_train_config
from tests.train.test_train import changed_keys, losses, snapshot


def test_contrastive_stage_trains_encoder_and_projector_only(
    tmp_path: Path, colour_world: dict[str, Path]
) -> None:
    stage = align_stage(
        colour_world,
        objective="contrastive",
        train_encoders="all",
        batch_size=8,
        micro_batch_size=8,
        max_steps=8,
        lr=3e-3,
    )
    cfg = tiny_train_config(tmp_path / "run", {"pretrain": stage})
    before = snapshot(build_stage_model(cfg, "pretrain"))
    final: dict[str, torch.Tensor] = {}

    def keep_final(info: StepInfo) -> None:
        if info.step == info.total_steps:
            final.update(snapshot(info.model))

    out = train(cfg, on_step=keep_final)
    changed = changed_keys(before, final)
    assert any(k.startswith("encoders.image.") for k in changed)
    assert any(k.startswith("projectors.image.") for k in changed)
    assert not any(k.startswith("llm.") for k in changed)
    history = losses(out)
    assert history[-1] < history[0]
    assert (out / "encoders" / "image.safetensors").is_file()


def test_identical_captions_are_positives(colour_world: dict[str, Path]) -> None:
    cfg = tiny_train_config(Path("unused"), {"pretrain": align_stage(colour_world, objective="contrastive")})
    model = build_stage_model(cfg, "pretrain")
    red = np.zeros((32, 32, 3), dtype=np.uint8)
    red[..., 0] = 230
    blue = np.zeros((32, 32, 3), dtype=np.uint8)
    blue[..., 2] = 230
    examples = [
        model.processor(
            [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}], {"image": [img]}
        )
        for caption, img in (("a red picture", red), ("a red picture", red), ("a blue picture", blue))
    ]
    batch = model.processor.collate(examples)
    aligner = ContrastiveAligner(model, temperature=0.07)
    ids, weights = aligner.captions(batch["labels"])
    assert _same_rows(ids).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    words = [model.tokenizer.decode([int(i)]) for i in ids[0] if i >= 0]
    shared = [w for w in words if w.strip() in ("a", "picture", "<|im_end|>")]
    assert shared and all(  # idf: the words every caption has weigh nothing; "red" (2 of 3) weighs log(4/3)
        weights[0, k] == 0 for k, w in enumerate(words) if w in shared
    )
    assert weights[0, words.index(" red")] == pytest.approx(np.log(4 / 3))
    loss = aligner(input_ids=batch["input_ids"], labels=batch["labels"], media=batch["media"])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.projectors["image"].linear_1.weight.grad is not None
    with torch.no_grad():  # the word-match term adds its weighted share, computed on the same tokens
        inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "media": batch["media"]}
        tokens = aligner.media_tokens(batch["input_ids"], batch["media"], {})
        match = word_match_loss(tokens, model.llm.get_input_embeddings()(ids.clamp(min=0)), weights)
        with_match = ContrastiveAligner(model, temperature=0.07, terms={"word_match": 0.5})(**inputs)
        torch.testing.assert_close(with_match, aligner(**inputs) + 0.5 * match)


def test_contrastive_needs_a_frozen_llm(colour_world: dict[str, Path]) -> None:
    stage = align_stage(colour_world, objective="contrastive", llm="lora")
    with pytest.raises(ValueError, match="contrastive objective uses the frozen LLM"):
        validate_train_config(tiny_train_config(Path("unused"), {"pretrain": stage}))


def test_caption_words_reward_tokens_that_name_them() -> None:
    torch.manual_seed(0)
    table = torch.nn.Embedding(20, 16)
    caption_ids = torch.tensor([[3, 4, 5, -1], [6, 7, -1, -1]])
    weights = (caption_ids >= 0).float()
    matching = [table.weight[[3, 4, 5]].detach(), table.weight[[6, 7]].detach()]  # one token per word
    swapped = matching[::-1]
    good = caption_word_loss(matching, caption_ids, weights, table, temperature=0.07)
    bad = caption_word_loss(swapped, caption_ids, weights, table, temperature=0.07)
    assert good < bad
    # the best any bag can do is its own entropy (3 and 2 equally weighted words) in the sample -> words
    # direction, and 0 in the word -> samples direction (each word is in one caption only)
    floor = (np.log(3) + np.log(2)) / 2 / 2
    assert floor - 1e-4 <= good.item() < floor + 0.05
    tokens = [torch.randn(2, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)]
    caption_word_loss(tokens, caption_ids, weights, table, temperature=0.07).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tokens)


def test_caption_words_penalise_a_token_that_names_a_word_for_every_sample() -> None:
    """An empty grid cell whose token says "circle" in every image must not pass for seeing a circle."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(20, 16)
    caption_ids = torch.tensor([[3, 4, -1], [3, 5, -1], [6, 5, -1]])  # word 3 in captions 0 and 1 only
    weights = (caption_ids >= 0).float()
    words = table.weight.detach()
    own = [words[[3, 4]], words[[3, 5]], words[[6, 5]]]
    everywhere = [torch.cat([t, words[[3]]]) for t in own]  # every sample also names word 3
    discriminative = [torch.cat([t, words[[11]]]) for t in own]  # the same extra token, naming nothing
    loss = {
        name: caption_word_loss(tokens, caption_ids, weights, table, temperature=0.07).item()
        for name, tokens in (("everywhere", everywhere), ("discriminative", discriminative))
    }
    assert loss["everywhere"] > loss["discriminative"] + 0.1


def test_caption_words_score_each_sample_by_its_own_tokens_only() -> None:
    """Samples with different token counts (padded in one batched product): a sample's score of a word is
    the logsumexp over its own tokens, as computed one sample at a time."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(30, 16)
    caption_ids = torch.tensor([[3, 4, 5, -1], [6, 3, -1, -1], [7, 8, 9, 4]])
    weights = torch.rand(3, 4) * (caption_ids >= 0)
    tokens = [torch.randn(n, 16, requires_grad=True) for n in (5, 1, 3)]
    loss = caption_word_loss(tokens, caption_ids, weights, table, temperature=0.07)
    loss.backward()

    vocab, inverse = torch.unique(caption_ids, return_inverse=True)
    words = torch.nn.functional.normalize(table(vocab.clamp(min=0)).detach(), dim=-1)
    scores = torch.stack(
        [(torch.nn.functional.normalize(t, dim=-1) @ words.T / 0.07).logsumexp(0) for t in tokens]
    )[:, vocab >= 0]
    target = torch.zeros(3, len(vocab)).scatter_add_(1, inverse, weights)[:, vocab >= 0]
    by_sample = -(target / target.sum(1, keepdim=True) * scores.log_softmax(1)).sum(1).mean()
    by_word = -(target / target.sum(0, keepdim=True) * scores.log_softmax(0)).sum(0).mean()
    assert loss.item() == pytest.approx(((by_sample + by_word) / 2).item(), abs=1e-5)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tokens)


def test_word_match_pulls_the_closest_token_onto_each_word() -> None:
    torch.manual_seed(0)
    table = torch.nn.Embedding(20, 16)
    caption_ids = torch.tensor([[3, 4, -1], [6, -1, -1]])
    weights = torch.tensor([[1.0, 0.5, 0.0], [2.0, 0.0, 0.0]])
    words = table.weight.detach()
    exact = [torch.cat([words[[4, 3]] * 3.0, torch.randn(1, 16)]), words[[6]]]  # scale does not matter
    assert word_match_loss(exact, table(caption_ids.clamp(min=0)), weights).item() == pytest.approx(
        0.0, abs=1e-6
    )
    tokens = [torch.randn(3, 16, requires_grad=True), torch.randn(2, 16, requires_grad=True)]
    loss = word_match_loss(tokens, table(caption_ids.clamp(min=0)), weights)
    assert loss.item() > 0.5  # random directions in 16-D are far from any word
    loss.backward()
    closest = (torch.nn.functional.normalize(tokens[1].detach(), dim=-1) @ words[6]).argmax()
    assert tokens[1].grad[closest].abs().sum() > 0 and tokens[1].grad[1 - closest].abs().sum() == 0


def test_word_mix_vocabulary_comes_from_the_captions_and_its_count_term_trains_it(
    tmp_path: Path, colour_world: dict[str, Path]
) -> None:
    stage = align_stage(
        colour_world,
        objective="contrastive",
        train_encoders="all",
        loss_terms={"word_count": 2.0},
        batch_size=8,
        micro_batch_size=8,
        max_steps=1,
    )
    cfg = tiny_train_config(tmp_path / "run", {"pretrain": stage})
    cfg.model.modalities["image"].projector = ProjectorConfig(type="word_mix", options={"vocab_size": 16})
    model = build_stage_model(cfg, "pretrain")  # its prepare hook anchors it on the stage's captions
    tokenizer = model.tokenizer
    projector = model.projectors["image"]
    words = {tokenizer.decode([i]) for i in projector.word_ids.tolist() if i >= 0}
    assert {"a", " red", " green", " blue", " yellow", " picture"} <= words
    vocabulary = caption_vocabulary(stage_replies(model, stage, "image"), tokenizer, 16)
    assert projector.word_ids.tolist() == vocabulary + [-1] * (16 - len(words))
    assert list(stage_replies(model, stage, "audio")) == []  # no audio records
    aligner = ContrastiveAligner(model, temperature=0.07, terms={"word_count": 2.0})
    dataset = ConversationDataset(stage.data, model.processor)
    batch = model.processor.collate([dataset[i] for i in range(4)])
    inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "media": batch["media"]}
    with torch.no_grad():
        ids, _ = aligner.captions(batch["labels"])
        pairs = model.encode_with_aux("image", batch["media"]["image"])
        count = word_count_loss([p for _, p in pairs], projector.word_ids, ids)
        without = ContrastiveAligner(model, temperature=0.07)(**inputs)
        torch.testing.assert_close(aligner(**inputs), without + 2.0 * count)
    assert count > 0
    loss = aligner(**inputs)
    loss.backward()
    assert projector.linear_2.weight.grad.abs().sum() > 0 and projector.null.grad is not None
