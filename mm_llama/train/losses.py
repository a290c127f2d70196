"""The objectives' named loss terms and their weights.

A stage's loss is a weighted sum of named terms: the pieces of its objective and the terms its
projectors contribute (``Projector.LOSS_TERMS``, see :mod:`mm_llama.projectors.base`). The stage's
``loss_terms: {name: weight}`` sets weights over the defaults; a term of weight 0 is not computed.

The ``contrastive`` objective's pieces live in the :data:`CONTRASTIVE_TERMS` registry (defaults):

    infonce        1.0  symmetric InfoNCE between each sample's mean media token and its (weighted) mean
                        caption embedding; samples with identical captions are positives of each other
    caption_words  1.0  each sample's tokens must name its caption's words among the batch's caption
                        words, and each word must be named by the samples whose captions hold it
                        (:func:`caption_word_loss`)
    word_match     0.0  each caption word pulls the media token closest to it onto its input embedding
                        (:func:`word_match_loss`)
    token_scale    1.0  keeps every media token's norm at the mean norm of the caption's word embeddings

A user adds a piece from their own file (a plugin)::

    from mm_llama.train.losses import CONTRASTIVE_TERMS, ContrastiveInputs, LossPiece

    def spread(inputs: ContrastiveInputs) -> torch.Tensor: ...      # a scalar, mean over the samples
    CONTRASTIVE_TERMS.register("spread", LossPiece(spread, default_weight=0.0))

The ``lm`` objective is the next-token loss on the replies (weight 1), plus weighted projector terms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mm_llama.processor import IGNORE_INDEX
from mm_llama.projectors.base import AuxBatch, Projector
from mm_llama.registry import Registry


@dataclass
class ContrastiveInputs:
    """What a contrastive loss piece reads: one micro-batch of B samples."""

    tokens: list[torch.Tensor]
    """B x (M_b, D) float32: each sample's projected media tokens (all its items')."""
    caption_ids: torch.Tensor
    """(B, L) each sample's caption token ids (the supervised label tokens), -1 padded."""
    weights: torch.Tensor
    """(B, L) each caption token's weight (idf or uniform, see ``contrastive.weighting``), 0 at padding."""
    caption_embeds: torch.Tensor
    """(B, L, D) float32 the caption tokens' LLM input embeddings (no gradient; any value at padding)."""
    text: torch.Tensor
    """(B, D) each caption's weighted mean input embedding."""
    word_norm: torch.Tensor
    """The mean norm of the caption tokens' input embeddings (a scalar)."""
    table: nn.Embedding
    """The LLM's input embedding table."""
    temperature: float
    """``contrastive.temperature``."""


@dataclass(frozen=True)
class LossPiece:
    """A registered loss piece: ``compute(inputs)`` -> a scalar, and its weight when a stage names none."""

    compute: Callable[[ContrastiveInputs], torch.Tensor]
    default_weight: float = 0.0


CONTRASTIVE_TERMS: Registry[LossPiece] = Registry("contrastive loss term")
"""The contrastive objective's pieces; they are summed in registration order, then projector terms."""


def loss_weights(
    objective: str, overrides: Mapping[str, float], projector_terms: Iterable[str], where: str
) -> dict[str, float]:
    """The weight of every term a stage may compute, in summing order: the objective's pieces (their
    defaults, overridden by name), then the projector terms (0 unless named). ``where`` names the field
    in errors: unknown names, negative weights, a projector term named like a piece, and (for
    ``contrastive``) all weights 0 raise ``ValueError``."""
    pieces = {name: piece.default_weight for name, piece in CONTRASTIVE_TERMS.items()}
    if objective != "contrastive":
        pieces = {}
    terms = list(dict.fromkeys(projector_terms))
    clash = [t for t in terms if t in CONTRASTIVE_TERMS]
    if clash:
        raise ValueError(
            f"{where}: projector loss term(s) {', '.join(clash)} have the names of contrastive loss terms; "
            "rename them in the projector's LOSS_TERMS"
        )
    weights = pieces | {t: 0.0 for t in terms}
    for name, weight in overrides.items():
        if name not in weights:
            valid = ", ".join(weights) or "none (the model's projectors add no terms)"
            raise ValueError(
                f"{where}: unknown loss term {name!r} for objective {objective}; valid names: {valid}"
            )
        if not weight >= 0:
            raise ValueError(f"{where}.{name}: expected a weight >= 0, got {weight}")
        weights[name] = float(weight)
    if objective == "contrastive" and not any(weights.values()):
        raise ValueError(f"{where}: every loss term has weight 0; give one a positive weight")
    return weights


# ---- projector terms ----------------------------------------------------------------------------------
def weighted_terms(projectors: Mapping[str, Projector], weights: Mapping[str, float]) -> dict[str, list[str]]:
    """Modality -> the projector's terms that have a positive weight (modalities without any left out):
    the modalities whose projectors must run ``project_with_aux``."""
    out = {}
    for modality, projector in projectors.items():
        names = [t for t in projector.LOSS_TERMS if weights.get(t, 0.0) > 0]
        if names:
            out[modality] = names
    return out


def reply_ids(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, L) each row's supervised tokens in order, -1 padded (L: the most of a row)."""
    supervised = labels != IGNORE_INDEX
    ids = torch.full((labels.shape[0], int(supervised.sum(1).max())), -1, dtype=torch.long)
    for row in range(labels.shape[0]):
        caption = labels[row][supervised[row]]
        ids[row, : len(caption)] = caption
    return ids


def sample_rows(input_ids: torch.Tensor, placeholder_id: int, sizes: Sequence[int], what: str) -> list[int]:
    """The batch row of each media item (items fill the samples' placeholder slots in batch order; item
    ``i`` has ``sizes[i]`` tokens); ``ValueError(what)`` when they do not fit."""
    batch = input_ids.shape[0]
    slots = (input_ids == placeholder_id).sum(1).tolist()  # placeholders per sample
    rows, row = [], 0
    for size in sizes:
        while row < batch and slots[row] == 0:
            row += 1
        if row == batch or slots[row] < size:
            raise ValueError(what)
        rows.append(row)
        slots[row] -= size
    return rows


def projector_terms(
    projectors: Mapping[str, Projector],
    aux: Mapping[str, Mapping[int, list[torch.Tensor]]],
    caption_ids: torch.Tensor,
    weights: Mapping[str, float],
) -> list[torch.Tensor]:
    """``weight * term`` for every weighted term of each modality's projector, in modality order.
    ``aux``: modality -> batch row -> that sample's items' aux; ``caption_ids`` (B, L), -1 padded."""
    out = []
    for modality, by_row in aux.items():
        projector = projectors[modality]
        rows = sorted(by_row)
        if not rows:
            continue
        batch = AuxBatch([torch.cat(by_row[r]) for r in rows], caption_ids[rows])
        for name, value in projector.loss_terms(batch).items():
            if name not in projector.LOSS_TERMS:
                raise ValueError(
                    f"the {modality} projector ({type(projector).__name__}) returned a loss term {name!r} "
                    f"missing from its LOSS_TERMS {projector.LOSS_TERMS}"
                )
            if weights.get(name, 0.0) > 0:
                out.append(weights[name] * value)
    return out


# ---- the contrastive pieces --------------------------------------------------------------------------
def infonce_loss(inputs: ContrastiveInputs) -> torch.Tensor:
    """Symmetric InfoNCE between the L2-normalised mean media token and mean caption embedding of each
    sample, over the micro-batch; identical captions are positives of each other (soft targets)."""
    z_media = F.normalize(torch.stack([t.mean(0) for t in inputs.tokens]), dim=-1)  # (B, D)
    logits = z_media @ F.normalize(inputs.text, dim=-1).T / inputs.temperature  # (B, B)
    same = _same_rows(inputs.caption_ids).float()
    targets = same / same.sum(1, keepdim=True)
    loss_media = -(targets * F.log_softmax(logits, dim=1)).sum(1)
    loss_text = -(targets * F.log_softmax(logits.T, dim=1)).sum(1)
    return ((loss_media + loss_text) / 2).mean()


def token_scale_loss(inputs: ContrastiveInputs) -> torch.Tensor:
    """Mean squared relative deviation of every media token's norm from the caption words' mean norm
    (InfoNCE only sees directions)."""
    norms = torch.cat([t.norm(dim=-1) for t in inputs.tokens])
    return ((norms / inputs.word_norm - 1.0) ** 2).mean()


def caption_word_loss(
    tokens: list[torch.Tensor],
    caption_ids: torch.Tensor,
    weights: torch.Tensor,
    table: nn.Embedding,
    temperature: float,
) -> torch.Tensor:
    """Symmetric cross-entropy between the samples' captions (weighted bags of words) and what their media
    tokens name.

    The vocabulary is the batch's caption words; a sample names a word as strongly as its closest token
    (a logsumexp over its tokens of cosine / temperature with the word's input embedding), so each token
    may carry its own words. Both ways, as InfoNCE: each sample must name its caption's words among the
    batch's words, and each word must be named by the samples whose captions hold it more than by the
    others (so a token that names a word for every sample gains nothing).
    ``tokens``: B x (M_b, D); ``caption_ids`` (B, L), -1 padded; ``weights`` (B, L), 0 at padding."""
    vocab, inverse = torch.unique(caption_ids, return_inverse=True)  # (V,), (B, L)
    with torch.no_grad():
        words = table(vocab.clamp(min=0)).float()  # (V, D)
        target = torch.zeros(len(tokens), len(vocab), device=words.device)  # (B, V)
        target.scatter_add_(1, inverse, weights.float())
        target[:, vocab < 0] = 0.0
    scores = (_padded_cosines(tokens, words) / temperature).logsumexp(1)  # (B, V)
    padding = vocab < 0
    log_words = F.log_softmax(scores.masked_fill(padding, float("-inf")), dim=1)  # (B, V): sample -> words
    by_sample = target / target.sum(1, keepdim=True)
    loss_words = -(by_sample * log_words.masked_fill(padding, 0.0)).sum(1).mean()
    named = target.sum(0) > 0  # (V,) words some caption weighs; idf-0 words (in every caption) drop out
    log_samples = F.log_softmax(scores[:, named], dim=0)  # (B, V'): word -> samples
    by_word = target[:, named] / target[:, named].sum(0, keepdim=True)
    loss_samples = -(by_word * log_samples).sum(0).mean()
    return (loss_words + loss_samples) / 2


def word_match_loss(tokens: list[torch.Tensor], words: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the caption-weighted 1 - cosine between each caption word's input embedding and
    the sample's media token closest to it (each word pulls only its closest token, so tokens settle on
    a word each). ``tokens``: B x (M_b, D); ``words``: (B, L, D) the captions' input embeddings (any
    value at padding); ``weights`` (B, L), 0 at padding."""
    closest = _padded_cosines(tokens, words.detach().float()).amax(1)  # (B, L) each word's best cosine
    per_sample = (weights * (1.0 - closest)).sum(1) / weights.sum(1).clamp(min=1e-8)
    return per_sample.mean()


def _padded_cosines(tokens: list[torch.Tensor], words: torch.Tensor) -> torch.Tensor:
    """Cosines between each sample's media tokens and words, in one batched product: ``tokens`` B x (M_b, D),
    ``words`` (B, L, D) each sample's or (L, D) shared -> (B, M, L), M = max M_b, -inf at the padding
    tokens (so a max or logsumexp over M sees each sample's own tokens only)."""
    counts = torch.tensor([len(t) for t in tokens], device=words.device)
    padded = nn.utils.rnn.pad_sequence([F.normalize(t, dim=-1) for t in tokens], batch_first=True)
    real = torch.arange(padded.shape[1], device=words.device) < counts[:, None]  # (B, M)
    sims = padded @ F.normalize(words, dim=-1).transpose(-1, -2)
    return sims.masked_fill(~real[..., None], float("-inf"))


def idf(ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids (-1 = padding) -> (B, L) log((1 + B) / (1 + df)) of each token, df = how many rows hold it."""
    rows = ids.shape[0]
    vocab, inverse = torch.unique(ids, return_inverse=True)  # (V,), (B, L)
    present = torch.zeros(rows, len(vocab), dtype=torch.bool, device=ids.device)
    present.scatter_(1, inverse, True)
    df = present.sum(0).float()  # (V,) rows holding each token
    return torch.log((1.0 + rows) / (1.0 + df))[inverse]


def _same_rows(ids: torch.Tensor) -> torch.Tensor:
    """(B, B) True where two rows of ``ids`` are identical."""
    return (ids.unsqueeze(1) == ids.unsqueeze(0)).all(-1)


CONTRASTIVE_TERMS.register("infonce", LossPiece(infonce_loss, default_weight=1.0))
CONTRASTIVE_TERMS.register(
    "caption_words",
    LossPiece(
        lambda i: caption_word_loss(i.tokens, i.caption_ids, i.weights, i.table, i.temperature),
        default_weight=1.0,
    ),
)
CONTRASTIVE_TERMS.register(
    "word_match", LossPiece(lambda i: word_match_loss(i.tokens, i.caption_embeds, i.weights))
)
CONTRASTIVE_TERMS.register("token_scale", LossPiece(token_scale_loss, default_weight=1.0))
