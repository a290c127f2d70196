"""Text + media -> model inputs.

The processor renders a conversation with the LLM tokenizer's chat template (or LLaVA's ``plain``
stage-1 format), expands every modality marker (``<image>``, ``<audio>``, ...) into as many placeholder
ids as the projector will emit for that item, and builds labels that are -100 everywhere except on the
assistant replies. It also preprocesses the media through each encoder's preprocessor and counts the
tokens each item needs with the projector's ``count_tokens``. Batches are padded on the right for
training and on the left for generation.

It stands alone, like transformers' ``LlavaProcessor``: :meth:`MultimodalProcessor.from_config` builds it
from a ``ModelConfig`` (the tokenizer and the encoders' preprocessors; no LLM, no weights), it saves and
loads by itself (``tokenizer/`` + ``processor.yaml``, or a model checkpoint folder), and it pickles, so
``DataLoader`` workers started with ``spawn`` receive it (plugin modalities included: their files are
imported again in the worker first).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jinja2 import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mm_llama.config import (
    ModalityConfig,
    ModelConfig,
    Template,
    build_options,
    from_dict,
    read_mapping,
    save_config,
)
from mm_llama.encoders.base import MediaPreprocessor, build_preprocessor
from mm_llama.errors import ConversationError, LabelMaskError, MissingInputError, MMInputError
from mm_llama.modality import check_modality, marker
from mm_llama.plugins import import_plugins, imported_plugins
from mm_llama.projectors.base import PROJECTORS

IGNORE_INDEX = -100
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
"""Used when the tokenizer has no chat template (a base model): Vicuna-style USER/ASSISTANT turns."""
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = 'A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human\\'s questions.' -%}"
    "{%- set turns = messages -%}{%- endif -%}"
    "{{ system }}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}{{ (' ' if loop.first else '') + 'USER: ' + m['content'] + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
"""LLaVA-1.5's conversation (its ``conv_vicuna_v1``): the system prompt, then ``USER: ... ASSISTANT: ...</s>``
turns on one line, separated by a space after the user's turn and by EOS after the assistant's."""
CHATML_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML (SmolLM2's and Qwen's turns) with a system turn only when the conversation has one: their own
templates always open with one, a default prompt or an empty ``<|im_start|>system\n<|im_end|>\n`` (5
tokens of every sequence, 15% of a short toy conversation)."""
CHAT_TEMPLATES = {
    "fallback": FALLBACK_CHAT_TEMPLATE,
    "vicuna_v1": VICUNA_V1_CHAT_TEMPLATE,
    "chatml": CHATML_CHAT_TEMPLATE,
}
"""Named templates the ``chat_template`` option accepts besides a Jinja string."""
ENCODED_CACHE_SIZE = 65536
"""How many conversations a processor remembers the tokens of (a few MB for short conversations)."""
PLAIN_SEPARATOR = "\n"
"""What ends a reply under the ``plain`` template: LLaVA's ``conv_llava_plain.sep``."""
REPLY_SENTINEL = "\x00mm_llama_reply\x00"
"""Stands in for a reply while locating where the template puts replies (see ``_render``)."""

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

PROCESSOR_FILE = "processor.yaml"
TOKENIZER_DIR = "tokenizer"
MODEL_CONFIG_FILE = "mm_llama.yaml"
"""A model checkpoint's config (see ``mm_llama.model_io``): a processor loads from it too."""

MediaHandler = Callable[[Any], tuple[torch.Tensor, int]]
"""Raw item -> (preprocessed tensor, number of placeholder tokens it needs)."""


@dataclass
class ProcessorConfig:
    """What a processor is built from: the model config without its LLM."""

    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    template: Template = "chat"
    system_prompt: str | None = None
    max_length: int = 2048
    chat_template: str | None = None


@dataclass
class MediaTokens:
    """A modality's media handler: the encoder's preprocessor, then the projector's token count."""

    preprocessor: MediaPreprocessor
    projector: type
    """The projector class (its ``count_tokens`` classmethod; no weights)."""
    projector_options: Any

    def __call__(self, item: Any) -> tuple[torch.Tensor, int]:
        x = self.preprocessor(item)
        return x, self.projector.count_tokens(self.projector_options, self.preprocessor.num_tokens(x))


def media_tokens(modality: str, spec: ModalityConfig) -> MediaTokens:
    """The handler of one configured modality (options validated; nothing with weights is built)."""
    projector = PROJECTORS.get(spec.projector.type)
    options = build_options(
        projector.Options, spec.projector.options, f"modalities.{modality}.projector.options"
    )
    return MediaTokens(build_preprocessor(modality, spec.encoder), projector, options)


@dataclass
class Example:
    """One tokenized sample: ids, labels, and its preprocessed media in marker order."""

    input_ids: list[int]
    labels: list[int]
    media: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    dropped_turns: int = 0
    """Whole turns (a user message and its replies) left out to fit ``max_length``: the oldest ones of a
    prompt to answer, the last ones of a training conversation."""


def normalize_messages(
    conversation: Sequence[dict[str, str]], where: str = "conversation"
) -> list[dict[str, str]]:
    """Accept ``{"role", "content"}`` or LLaVA's ``{"from", "value"}`` turns; return role/content dicts."""
    messages = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise ConversationError(f"{where}[{i}]: expected a mapping, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise ConversationError(
                f"{where}[{i}]: role/from must be one of {sorted(ROLE_ALIASES)}, got {role!r}"
            )
        if not isinstance(content, str):
            raise ConversationError(
                f"{where}[{i}]: content/value must be a string, got {type(content).__name__}"
            )
        messages.append({"role": ROLE_ALIASES[role], "content": content})
    return messages


def _restore(plugins: list[str], state: bytes) -> MultimodalProcessor:
    import_plugins(plugins)
    processor = MultimodalProcessor.__new__(MultimodalProcessor)
    processor.__dict__.update(pickle.loads(state))
    return processor


class MultimodalProcessor:
    """Tokenizes conversations with media markers for a :class:`~mm_llama.model.MultimodalLM`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        handlers: dict[str, MediaHandler],
        template: Literal["chat", "plain"] = "chat",
        system_prompt: str | None = None,
        max_length: int = 2048,
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.handlers = handlers
        self.template = template
        self.system_prompt = system_prompt
        self.max_length = max_length
        if chat_template is not None:
            tokenizer.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
        elif template == "chat" and not tokenizer.chat_template:
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        markers = [marker(m) for m in handlers]
        missing = [m for m in markers if m not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens(
                {"additional_special_tokens": missing}, replace_extra_special_tokens=False
            )
        self.placeholder_ids = {m: tokenizer.convert_tokens_to_ids(marker(m)) for m in handlers}
        self._marker_re = re.compile("(" + "|".join(re.escape(m) for m in markers) + ")") if markers else None
        self.config: ProcessorConfig | None = None
        """What :meth:`from_config` built this processor from (``None`` for hand-made handlers)."""
        self._encoded: dict[tuple, tuple[list[int], list[int]]] = {}
        """Token ids and labels by conversation text (:meth:`_encode`): a stage sees each record once an
        epoch, and rendering + tokenizing took about a third of a millisecond a record."""

    # ---- construction, save and load -------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: ModelConfig | ProcessorConfig, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> MultimodalProcessor:
        """The processor of a model config: the LLM's tokenizer (or ``tokenizer``) and each modality's
        preprocessor and token count. Builds no LLM and reads no weights."""
        if isinstance(config, ModelConfig):
            if tokenizer is None:
                from mm_llama.llm import load_tokenizer

                tokenizer = load_tokenizer(config.llm)
            config = ProcessorConfig(
                dict(config.modalities),
                config.template,
                config.system_prompt,
                config.max_length,
                config.chat_template,
            )
        elif tokenizer is None:
            raise MMInputError("MultimodalProcessor.from_config: a ProcessorConfig needs a tokenizer")
        for name in config.modalities:
            check_modality(name)
        handlers = {name: media_tokens(name, spec) for name, spec in config.modalities.items()}
        processor = cls(
            tokenizer,
            handlers,
            config.template,
            config.system_prompt,
            config.max_length,
            config.chat_template,
        )
        processor.config = config
        return processor

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``tokenizer/`` and ``processor.yaml`` into ``path`` (a model checkpoint folder or its own)."""
        if self.config is None:
            raise MMInputError(
                "save_pretrained: this processor was not built by from_config; it has no config"
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path / TOKENIZER_DIR)
        save_config(self.config, path / PROCESSOR_FILE)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MultimodalProcessor:
        """Load a folder written by :meth:`save_pretrained` or by ``MultimodalLM.save_pretrained``
        (``processor.yaml``, or else the model's ``mm_llama.yaml``, and ``tokenizer/``)."""
        path = Path(path)
        if not (path / TOKENIZER_DIR).is_dir():
            raise MissingInputError(f"{path} holds no saved processor: {TOKENIZER_DIR}/ not found in it")
        if (path / PROCESSOR_FILE).is_file():
            file, data = path / PROCESSOR_FILE, read_mapping(path / PROCESSOR_FILE)
        elif (path / MODEL_CONFIG_FILE).is_file():
            file, data = path / MODEL_CONFIG_FILE, read_mapping(path / MODEL_CONFIG_FILE)
            data = {k: v for k, v in data.items() if k != "llm"}
        else:
            raise MissingInputError(
                f"{path} holds no saved processor: no {PROCESSOR_FILE} or {MODEL_CONFIG_FILE}"
            )
        try:
            config = from_dict(ProcessorConfig, data)
        except ValueError as e:
            raise MMInputError(f"{file}: {e}") from e
        tokenizer = AutoTokenizer.from_pretrained(path / TOKENIZER_DIR)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls.from_config(config, tokenizer)

    def with_handlers(self, handlers: dict[str, MediaHandler]) -> MultimodalProcessor:
        """A copy whose given modalities use other handlers (e.g. reading cached features)."""
        processor = MultimodalProcessor(
            self.tokenizer,
            {**self.handlers, **handlers},
            template=self.template,
            system_prompt=self.system_prompt,
            max_length=self.max_length,
        )
        processor.config = self.config
        return processor

    def __reduce__(self) -> tuple[Any, ...]:
        # Plugin classes live in modules that a spawned worker has not imported: import their files there
        # before the rest of the state is unpickled. The remembered tokens stay behind.
        return _restore, (imported_plugins(), pickle.dumps({**self.__dict__, "_encoded": {}}))

    # ---- rendering -------------------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """The conversation as text segments, each flagged True when it is supervised: an assistant reply
        plus what the template closes its turn with (the end-of-turn token), never the role header.

        The reply spans are found by construction, whatever the template: the conversation up to an
        assistant turn is rendered with a sentinel as that turn's content, and the text before the
        sentinel is exactly what precedes the reply (the header included, whether or not the template has
        a generation-prompt marker), but for a trailing space, which starts the reply. The prompt to answer
        ends the same way, so generation sees the very header the replies were trained after."""
        if self.template == "plain":
            return self._render_plain(messages)
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]

        def header(before: list[dict[str, str]]) -> str:
            probe = self._apply_template([*before, {"role": "assistant", "content": REPLY_SENTINEL}])
            at = probe.find(REPLY_SENTINEL)
            if at < 0:
                raise MMInputError(
                    "the tokenizer's chat template drops the assistant's reply text, so replies cannot be "
                    "supervised; give a chat template that renders them"
                )
            # a space between the header and the reply goes with the reply ("ASSISTANT:" + " Red"), as when
            # the whole conversation is tokenized at once and as a generation prompt ends ("ASSISTANT:")
            return probe[:at].rstrip(" ")

        full = self._apply_template(messages)
        if add_generation_prompt:
            full = header(messages)
        segments, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = header(messages[:i])
            end = self._apply_template(messages[: i + 1])
            if len(start) < cursor or not end.startswith(start) or not full.startswith(end):
                raise MMInputError(
                    "the tokenizer's chat template does not render conversations prefix by prefix, so the "
                    "assistant replies cannot be located; set template: plain or give a chat template that does"
                )
            segments += [(full[cursor : len(start)], False), (full[len(start) : len(end)], True)]
            cursor = len(end)
        segments.append((full[cursor:], False))
        return [(text, sup) for text, sup in segments if text]

    def end_of_turn_ids(self) -> list[int]:
        """The token that closes an assistant turn under this template (``<|im_end|>``, Gemma's
        ``<end_of_turn>``, EOS, the ``plain`` separator): generation stops on it as on EOS. Found the way the
        reply spans are: what the template writes right after a reply."""
        if self.template == "plain":
            tail = PLAIN_SEPARATOR
        else:
            probe = self._apply_template(
                [{"role": "user", "content": "?"}, {"role": "assistant", "content": REPLY_SENTINEL}]
            )
            tail = probe[probe.find(REPLY_SENTINEL) + len(REPLY_SENTINEL) :]
        return self.tokenizer(tail, add_special_tokens=False)["input_ids"][:1] if tail else []

    def _apply_template(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant/..."
            roles = "/".join(m["role"] for m in messages)
            raise ConversationError(
                f"the tokenizer's chat template refused a {roles} conversation: {e}"
            ) from e

    def _render_plain(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """LLaVA's ``preprocess_plain``: BOS (when the tokenizer has one), then each user turn reduced to its
        media markers (its words dropped), each reply followed by the separator ``PLAIN_SEPARATOR``. The
        BOS keeps the first media token off the sequence's first position, which the LLM uses as an
        attention sink."""
        segments = [(self.tokenizer.bos_token, False)] if self.tokenizer.bos_token else []
        for m in messages:
            if m["role"] == "user" and self._marker_re is not None:
                segments.append(("".join(self._marker_re.findall(m["content"])), False))
            elif m["role"] == "assistant":
                segments.append((m["content"] + PLAIN_SEPARATOR, True))
        return [(text, sup) for text, sup in segments if text]

    # ---- encoding --------------------------------------------------------------------------------------
    def __call__(
        self,
        conversation: str | Sequence[dict[str, str]],
        media: dict[str, Sequence[Any]] | None = None,
        add_generation_prompt: bool = False,
        where: str = "prompt",
    ) -> Example:
        """Tokenize one prompt (a user message string) or conversation, with its media in marker order.

        ``media`` maps a modality to the raw items its markers refer to, in order of appearance.
        Raises ``ValueError`` when the number of markers and of items differ.

        Longer than ``max_length``: whole turns (a user message with its replies, and their media) are
        left out, never part of one: the oldest of a prompt to answer (``add_generation_prompt``), the
        last of a training conversation; ``Example.dropped_turns`` says how many. When even one turn does
        not fit, a prompt raises ``MMInputError``; a training reply is cut at its end (its media kept).
        """
        if isinstance(conversation, str):
            messages = [{"role": "user", "content": conversation}]
        else:
            messages = normalize_messages(conversation, where)
            if add_generation_prompt and (not messages or messages[-1]["role"] != "user"):
                raise ConversationError(f"{where}: a conversation to answer must end with a user turn")
        media = {k: list(v) for k, v in (media or {}).items() if v is not None}
        for name in media:
            if name not in self.handlers:
                raise ConversationError(
                    f"{where}: got {name} inputs but the model has no {name} encoder "
                    f"(its modalities: {', '.join(self.handlers) or 'none'})"
                )
        text = "".join(m["content"] for m in messages)
        for name in self.handlers:
            n_markers = text.count(marker(name))
            n_items = len(media.get(name, []))
            if n_markers != n_items:
                raise ConversationError(
                    f"{where}: {n_markers} {marker(name)} marker(s) in the text but {n_items} {name} "
                    f"input(s) given; put one {marker(name)} in the prompt for each {name}"
                )
        tensors: dict[str, list[torch.Tensor]] = {}
        counts: dict[str, list[int]] = {}
        for name, items in media.items():
            for item in items:
                tensor, n = self.handlers[name](item)
                tensors.setdefault(name, []).append(tensor)
                counts.setdefault(name, []).append(n)

        # each message's items, per modality, in marker order
        per_message: list[dict[str, list[int]]] = []
        seen = {name: 0 for name in self.handlers}
        for m in messages:
            own = {}
            for name in self.handlers:
                n = m["content"].count(marker(name))
                own[name] = list(range(seen[name], seen[name] + n))
                seen[name] += n
            per_message.append(own)
        head = 0  # leading system messages are always kept
        while head < len(messages) and messages[head]["role"] == "system":
            head += 1
        starts = [i for i in range(head, len(messages)) if i == head or messages[i]["role"] == "user"]
        turns = [list(range(a, b)) for a, b in zip(starts, [*starts[1:], len(messages)])]
        for dropped in range(max(len(turns), 1)):
            # generation keeps the newest turns (the question being asked); training keeps the first
            # ones (where the media usually are)
            kept_turns = turns[dropped:] if add_generation_prompt else turns[: len(turns) - dropped]
            kept = list(range(head)) + [i for turn in kept_turns for i in turn]
            items = {name: [j for i in kept for j in per_message[i][name]] for name in self.handlers}
            input_ids, labels = self._encode(
                [messages[i] for i in kept], {n: [counts[n][j] for j in items[n]] for n in items},
                add_generation_prompt,
            )  # fmt: skip
            if len(input_ids) <= self.max_length or len(kept_turns) <= 1:
                break
        if len(input_ids) > self.max_length:
            cut = input_ids[: self.max_length]
            total = sum(input_ids.count(pid) for pid in self.placeholder_ids.values())
            if add_generation_prompt or sum(cut.count(pid) for pid in self.placeholder_ids.values()) != total:
                what = "the newest turn" if add_generation_prompt else "the first turn, with its media,"
                raise ConversationError(
                    f"{where}: {len(input_ids)} tokens exceed max_length={self.max_length} even with "
                    f"{what} alone; raise max_length or shorten it"
                )
            input_ids, labels = cut, labels[: self.max_length]  # a training reply cut at its end
        return Example(
            input_ids=input_ids,
            labels=labels,
            media={n: [tensors[n][j] for j in items[n]] for n in items if items[n]},
            dropped_turns=dropped,
        )

    def _encode(
        self, messages: list[dict[str, str]], counts: dict[str, list[int]], add_generation_prompt: bool
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation; ``counts[m]`` are its items' placeholder counts.
        Remembered (up to ``ENCODED_CACHE_SIZE`` conversations) by everything the result depends on."""
        key = (
            tuple((m["role"], m["content"]) for m in messages),
            tuple((name, tuple(n)) for name, n in counts.items()),
            add_generation_prompt,
            self.template,
            self.system_prompt,
            self.tokenizer.chat_template,
            len(self.tokenizer),
        )
        cached = self._encoded.get(key)
        if cached is None:
            if len(self._encoded) >= ENCODED_CACHE_SIZE:
                self._encoded.clear()
            cached = self._encoded[key] = self._encode_uncached(messages, counts, add_generation_prompt)
        return list(cached[0]), list(cached[1])

    def _encode_uncached(
        self, messages: list[dict[str, str]], counts: dict[str, list[int]], add_generation_prompt: bool
    ) -> tuple[list[int], list[int]]:
        input_ids: list[int] = []
        labels: list[int] = []
        seen = {name: 0 for name in self.handlers}
        for segment, supervised in self._render(messages, add_generation_prompt):
            pieces = self._marker_re.split(segment) if self._marker_re else [segment]
            for piece in pieces:
                if not piece:
                    continue
                name = piece[1:-1]
                if name in self.handlers and piece == marker(name):
                    n = counts[name][seen[name]]
                    seen[name] += 1
                    input_ids += [self.placeholder_ids[name]] * n
                    labels += [IGNORE_INDEX] * n
                else:
                    ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                    input_ids += ids
                    labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        return input_ids, labels

    # ---- batching --------------------------------------------------------------------------------------
    def collate(
        self, examples: Sequence[Example], padding_side: Literal["right", "left"] = "right"
    ) -> dict[str, Any]:
        """Pad a list of examples: ``input_ids``/``attention_mask``/``labels`` (B, T) and ``media``,
        each modality's tensors flattened in batch-then-marker order (the order of the placeholders)."""
        pad_id = self.tokenizer.pad_token_id
        length = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        media: dict[str, list[torch.Tensor]] = {}
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            span = slice(0, n) if padding_side == "right" else slice(length - n, length)
            ids[row, span] = torch.tensor(e.input_ids, dtype=torch.long)
            mask[row, span] = 1
            labels[row, span] = torch.tensor(e.labels, dtype=torch.long)
            for name, tensors in e.media.items():
                media.setdefault(name, []).extend(tensors)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "media": media}


def check_labels(
    processor: MultimodalProcessor, conversation: Sequence[dict[str, str]], example: Example, where: str
) -> None:
    """Decode the supervised tokens of ``example`` and raise :class:`LabelMaskError` unless they are
    exactly the assistant replies of ``conversation`` in order, each followed by at least one
    end-of-turn token (a special token, or whitespace such as the ``plain`` separator) and nothing else.

    It guards what LLaVA's users meet as "loss 0" or "tokenization mismatch": a template whose role
    header is supervised, a reply left unsupervised, a turn with nothing to stop on. Turns the processor
    left out for length are not expected; a reply cut at ``max_length`` is compared up to the cut."""
    tokenizer = processor.tokenizer
    replies = [m["content"] for m in normalize_messages(conversation, where) if m["role"] == "assistant"]
    # special and added tokens, and what the template closes a turn with (found by construction)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    special.update(processor.end_of_turn_ids())

    def is_end(token: int) -> bool:
        return token in special or not tokenizer.decode([token]).strip()

    runs: list[list[int]] = []  # maximal runs of consecutive supervised tokens
    previous = IGNORE_INDEX
    for label in example.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    truncated = len(example.input_ids) >= processor.max_length
    queue = list(replies)
    for run_number, run in enumerate(runs):
        pos, last_run = 0, run_number == len(runs) - 1
        while pos < len(run):
            if not queue:
                _label_error(where, tokenizer, runs, replies, "supervised tokens beyond the last reply")
            reply = queue.pop(0).strip()
            # the shortest prefix that decodes to the reply (leading spaces vary between tokenizers)
            k = next(
                (j for j in range(pos, len(run) + 1) if tokenizer.decode(run[pos:j]).strip() == reply), None
            )
            if k is None:
                if last_run and truncated and reply.startswith(tokenizer.decode(run[pos:]).strip()):
                    return  # the reply was cut at max_length
                _label_error(where, tokenizer, runs, replies, f"reply {reply!r} is not what is supervised")
            end = k
            while end < len(run) and is_end(run[end]):
                end += 1
            if end == k and not (last_run and truncated and end == len(run)):
                _label_error(where, tokenizer, runs, replies, f"reply {reply!r} has no end-of-turn token")
            pos = end
    expected = len(replies) - _dropped_replies(normalize_messages(conversation, where), example.dropped_turns)
    if len(replies) - len(queue) < expected:
        _label_error(where, tokenizer, runs, replies, "a reply is not supervised")


def _dropped_replies(messages: list[dict[str, str]], dropped_turns: int) -> int:
    """How many assistant replies the last ``dropped_turns`` turns of a training conversation hold."""
    if not dropped_turns:
        return 0
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    first_dropped = users[-dropped_turns] if len(users) >= dropped_turns else 0
    return sum(m["role"] == "assistant" for m in messages[first_dropped:])


def _label_error(
    where: str, tokenizer: PreTrainedTokenizerBase, runs: list[list[int]], replies: list[str], why: str
) -> None:
    supervised = [tokenizer.decode(run) for run in runs]
    raise LabelMaskError(
        f"{where}: the label mask does not match the assistant replies ({why}); supervised text "
        f"{supervised!r}, replies {replies!r}. The chat template and the labels disagree: check the "
        "tokenizer's chat template (or set template: plain for captions)"
    )
