"""The ``mm-llama`` command: train, chat, eval, toyworld, cache-features, export, demo.

Every subcommand but ``toyworld`` takes ``--plugin FILE`` to register modalities or encoders first.

Each subcommand is a thin wrapper over an importable function; heavy modules are imported only when
their subcommand runs, so ``mm-llama --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mm_llama.plugins import add_plugin_arg, import_plugins


def _add_chat_args(parser: argparse.ArgumentParser) -> None:
    add_plugin_arg(parser)
    parser.add_argument("--checkpoint", required=True, help="a folder written by training or save_pretrained")
    for name in ("image", "audio", "video", "imu"):
        parser.add_argument(
            f"--{name}", action="append", default=[], metavar="PATH", help=f"a {name} file (repeatable)"
        )
    parser.add_argument(
        "--media",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a file of any modality the checkpoint has, e.g. depth=scan.npy for a plugin (repeatable)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument(
        "question", nargs="?", help="the question; markers are added for the media when missing"
    )


def build_prompt(question: str, media: dict[str, list[str]]) -> str:
    """Prefix one marker per media file unless the question already places them."""
    prefix = []
    for name, paths in media.items():
        if paths and f"<{name}>" not in question:
            prefix += [f"<{name}>"] * len(paths)
    return (" ".join(prefix) + "\n" + question) if prefix else question


def parse_media(args: argparse.Namespace) -> dict[str, list[str]]:
    """``--image``/``--audio``/``--video``/``--imu`` and ``--media NAME=PATH`` -> {modality: [paths]}."""
    media = {name: list(getattr(args, name)) for name in ("image", "audio", "video", "imu")}
    for item in args.media:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--media: expected NAME=PATH (e.g. depth=scan.npy), got {item!r}")
        media.setdefault(name, []).append(path)
    return media


def _run_chat(args: argparse.Namespace) -> None:
    from mm_llama.model import MultimodalLM

    media = parse_media(args)
    model = MultimodalLM.from_pretrained(args.checkpoint).eval()
    sampling = {"do_sample": args.temperature > 0, "temperature": args.temperature or 1.0}

    used = {name: paths for name, paths in media.items() if paths}
    conversation: list[dict[str, str]] = []  # interactive questions follow up on the earlier turns

    def answer(question: str) -> None:
        # the media go with the first question; later ones see them through the conversation
        turn = {"role": "user", "content": question if conversation else build_prompt(question, media)}
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


def _add_export_args(parser: argparse.ArgumentParser) -> None:
    add_plugin_arg(parser)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument(
        "--out", required=True, help="folder for a self-contained copy (LLM with LoRA merged)"
    )


def _run_export(args: argparse.Namespace) -> None:
    from mm_llama.model import MultimodalLM

    model = MultimodalLM.from_pretrained(args.checkpoint)
    print(f"wrote {model.save_pretrained(args.out, copy_llm=True)}")


def _add_demo_args(parser: argparse.ArgumentParser) -> None:
    add_plugin_arg(parser)
    parser.add_argument("--checkpoint", required=True, help="a folder written by training or save_pretrained")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link")


def _run_demo(args: argparse.Namespace) -> None:
    from mm_llama.demo import serve  # imports gradio (the "demo" extra)

    serve(args.checkpoint, host=args.host, port=args.port, share=args.share)


def build_parser() -> argparse.ArgumentParser:
    from mm_llama.data import toyworld
    from mm_llama.eval import cli as eval_cli
    from mm_llama.train import cli as train_cli

    parser = argparse.ArgumentParser(prog="mm-llama", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "train": (
            "train projectors / LoRA from a YAML config",
            train_cli.add_train_args,
            train_cli.run_train,
        ),
        "chat": ("ask a trained model about media files", _add_chat_args, _run_chat),
        "eval": (
            "evaluate on a benchmark with the official metric",
            eval_cli.add_eval_args,
            eval_cli.run_eval,
        ),
        "toyworld": ("generate the toy multimodal world", toyworld.add_toyworld_args, toyworld.run_toyworld),
        "cache-features": (
            "precompute frozen encoder outputs",
            train_cli.add_cache_args,
            train_cli.run_cache_features,
        ),
        "export": ("write a self-contained checkpoint", _add_export_args, _run_export),
        "demo": ("serve the Gradio demo for a checkpoint", _add_demo_args, _run_demo),
    }
    for name, (help_text, add_args, run) in commands.items():
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import_plugins(getattr(args, "plugin", []))  # registrations first: configs and checkpoints name them
    args.func(args)


if __name__ == "__main__":
    main()
