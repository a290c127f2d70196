"""Plugins: Python files that register modalities, encoders or projectors before a config names them.

Every ``mm-llama`` subcommand that loads a config or a checkpoint takes ``--plugin FILE`` (repeatable),
and ``mm_llama.cli.main`` imports them before it parses the command line (so a plugin modality has its
``chat --NAME`` flag) and before the subcommand runs; see docs/new_modality.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from mm_llama.errors import MMInputError


def add_plugin_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--plugin FILE`` (repeatable) to ``parser``."""
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a Python file to import first, e.g. one that registers a modality and its encoder (repeatable)",
    )
    return parser


_IMPORTED: list[str] = []
"""The plugin files imported in this process, in order (resolved paths)."""


def imported_plugins() -> list[str]:
    """The plugin files this process imported, so that a spawned worker can import them too."""
    return list(_IMPORTED)


def import_plugins(files: Sequence[Path | str]) -> None:
    """Import each file as module ``mm_llama_plugin_<stem>``, so that its registrations run (e.g.
    ``register_modality`` and ``register_encoder``) before a config names them. A file already imported
    (same resolved path) is not run again."""
    for file in map(Path, files):
        if not file.is_file():
            raise MMInputError(f"--plugin: file not found: {file}")
        name = f"mm_llama_plugin_{file.stem}"
        loaded = sys.modules.get(name)
        if loaded is not None:
            if Path(loaded.__file__).resolve() == file.resolve():
                continue
            raise ValueError(
                f"--plugin: {file} and {loaded.__file__} have the same file name; rename one of them"
            )
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and typing resolve the module's annotations there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        _IMPORTED.append(str(file.resolve()))
