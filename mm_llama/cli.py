"""The ``mm-llama`` command: train, chat, eval, toyworld, realworld, cache-features, export, import-llava,
demo.

Every subcommand but ``toyworld`` takes ``--plugin FILE`` to register modalities or encoders first.

Each subcommand is a thin wrapper over an importable function. Their arguments are defined in the light
:mod:`mm_llama.cli_args`; the modules that run them (torch, transformers, gradio, ...) are imported only
when their subcommand runs, so ``mm-llama --help`` and every ``mm-llama SUBCOMMAND --help`` stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mm_llama import cli_args
from mm_llama.errors import MissingInputError, MMInputError
from mm_llama.modality import modalities, with_markers
from mm_llama.plugins import add_plugin_arg, import_plugins

Runner = Callable[[argparse.Namespace], Any]


def parse_media(args: argparse.Namespace) -> dict[str, list[str]]:
    """``chat``'s per-modality flags (``--image PATH``, ...) and ``--media NAME=PATH`` -> {modality: [paths]},
    every registered modality a key; a name that no modality has (or a plugin not imported) raises."""
    known = modalities()
    media = {name: list(getattr(args, cli_args.media_dest(name), [])) for name in known}
    for item in args.media:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--media: expected NAME=PATH (e.g. depth=scan.npy), got {item!r}")
        if name not in media:
            raise ValueError(
                f"--media {item}: unknown modality {name!r}; known: {', '.join(known)} "
                "(a plugin modality needs its file: --plugin FILE)"
            )
        media[name].append(path)
    return media


def check_media_files(media: dict[str, list[str]]) -> None:
    """Every given media path exists and is a readable file, and an image's header (and pixels) decode,
    before any checkpoint is loaded: a typo costs no model load. Raises ``MMInputError`` naming the flag."""
    for name, paths in media.items():
        for path in paths:
            file = Path(path)
            if not file.exists():
                raise MissingInputError(f"--{name} {path}: file not found")
            if not file.is_file():
                raise MMInputError(f"--{name} {path}: expected a file, found a folder or a special file")
            try:
                with file.open("rb"):
                    pass
            except OSError as e:
                raise MMInputError(f"--{name} {path}: cannot read it ({e.strerror or e})") from e
            if name == "image":
                from mm_llama.encoders.image import load_image  # raises MMInputError naming the file

                load_image(file)


@contextlib.contextmanager
def notices() -> Iterator[None]:
    """While it lasts, warnings of mm_llama's loggers (e.g. an audio file longer than the encoder reads)
    are printed to stderr as ``mm-llama: note: ...`` lines, whatever logging is configured."""
    log = logging.getLogger("mm_llama")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("mm-llama: note: %(message)s"))
    propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _run_chat(args: argparse.Namespace) -> None:
    with notices():
        _chat(args)


def _chat(args: argparse.Namespace) -> None:
    from mm_llama.model import MultimodalLM

    media = parse_media(args)
    check_media_files(media)
    model = MultimodalLM.from_pretrained(args.checkpoint).eval()
    sampling = {"do_sample": args.temperature > 0, "temperature": args.temperature or 1.0}

    used = {name: paths for name, paths in media.items() if paths}
    conversation: list[dict[str, str]] = []  # interactive questions follow up on the earlier turns

    def answer(question: str) -> None:
        # the media go with the first question; later ones see them through the conversation
        turn = {"role": "user", "content": question if conversation else with_markers(question, media)}
        reply = ""
        for piece in model.generate(
            [*conversation, turn], media=used, max_new_tokens=args.max_new_tokens, stream=True, **sampling
        ):
            reply += piece
            print(piece, end="", flush=True)
        print()
        conversation.extend([turn, {"role": "assistant", "content": reply.strip()}])

    if args.question:
        answer(args.question)
        return
    print("Ask a question; follow-ups see the earlier turns (empty line or Ctrl-D to quit).")
    for line in sys.stdin:
        if not line.strip():
            break
        answer(line.strip())


def _run_export(args: argparse.Namespace) -> None:
    from mm_llama.model import MultimodalLM

    if args.format == "llava-hf":
        from mm_llama.config import ModelConfig, load_config
        from mm_llama.interop.llava import check_exportable, export_llava_hf
        from mm_llama.processor import MODEL_CONFIG_FILE

        config_file = Path(args.checkpoint) / MODEL_CONFIG_FILE
        if config_file.is_file():  # refuse what llava-hf cannot hold before loading any weights
            check_exportable(load_config(ModelConfig, config_file), str(args.checkpoint))
        print(f"wrote {export_llava_hf(MultimodalLM.from_pretrained(args.checkpoint), args.out)}")
        return
    model = MultimodalLM.from_pretrained(args.checkpoint)
    print(f"wrote {model.save_pretrained(args.out, copy_llm=True)}")


def _run_import_llava(args: argparse.Namespace) -> None:
    from mm_llama.interop.llava import import_llava

    out = import_llava(
        args.source,
        args.out,
        llm=args.llm,
        vision_tower=args.vision_tower,
        allow_pickle=args.allow_pickle,
        dtype=args.dtype,
    )
    print(f"wrote {out}")


def _lazy(target: str) -> Runner:
    """The function ``"module:name"``, imported when first called (its module may load torch)."""
    module, _, name = target.partition(":")

    def run(args: argparse.Namespace) -> Any:
        return getattr(importlib.import_module(module), name)(args)

    run.__qualname__ = run.__name__ = name
    return run


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Any], Runner]] = {
    "train": (
        "train projectors / LoRA from a YAML config",
        cli_args.add_train_args,
        _lazy("mm_llama.train.cli:run_train"),
    ),
    "chat": ("ask a trained model about media files", cli_args.add_chat_args, _run_chat),
    "eval": (
        "evaluate on a benchmark with the official metric",
        cli_args.add_eval_args,
        _lazy("mm_llama.eval.cli:run_eval"),
    ),
    "toyworld": (
        "generate the toy multimodal world",
        cli_args.add_toyworld_args,
        _lazy("mm_llama.data.toyworld:run_toyworld"),
    ),
    "realworld": (
        "train and evaluate on real photos, speech and smartwatch motion (the pretrained extra)",
        cli_args.add_realworld_args,
        _lazy("mm_llama.realworld:run_realworld"),
    ),
    "cache-features": (
        "precompute frozen encoder outputs",
        cli_args.add_cache_args,
        _lazy("mm_llama.train.cli:run_cache_features"),
    ),
    "export": ("write a self-contained checkpoint", cli_args.add_export_args, _run_export),
    "import-llava": (
        "a llava-hf folder or LLaVA-1.5 projector -> an mm_llama checkpoint",
        cli_args.add_import_llava_args,
        _run_import_llava,
    ),
    "demo": (
        "serve the Gradio demo for a checkpoint",
        cli_args.add_demo_args,
        _lazy("mm_llama.demo:run_demo"),  # imports gradio (the "demo" extra)
    ),
}
"""Subcommand -> (help, the function adding its arguments, the function running it)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``mm-llama`` parser; ``chat`` gets a flag for each modality registered so far."""
    parser = argparse.ArgumentParser(prog="mm-llama", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an input error (anywhere on the line)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=run)
    return parser


def plugin_files(argv: Sequence[str]) -> list[Path]:
    """The ``--plugin FILE`` values in a command line, found before the full parse."""
    pre = add_plugin_arg(argparse.ArgumentParser(prog="mm-llama", add_help=False))
    known, _ = pre.parse_known_args(list(argv))
    return known.plugin


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        # Plugins first: their modalities get their chat flags (--depth) and help lines, and configs and
        # checkpoints name them. Importing a file twice runs it once.
        import_plugins(plugin_files(argv))
        args = build_parser().parse_args(argv)
        import_plugins(getattr(args, "plugin", []))
        args.func(args)
    except MMInputError as e:  # the user's input: one line and exit code 2 (--debug: the traceback)
        if debug:
            raise
        print(f"mm-llama: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
