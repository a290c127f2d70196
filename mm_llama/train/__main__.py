"""``python -m mm_llama.train --config FILE``: training alone, e.g. ``accelerate launch -m mm_llama.train``."""

from __future__ import annotations

import argparse
import logging

from mm_llama.train.cli import add_train_args, run_train


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_train(add_train_args(argparse.ArgumentParser(prog="python -m mm_llama.train")).parse_args())


if __name__ == "__main__":
    main()
