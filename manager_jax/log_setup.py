"""Logging of the commands: one setup and one `--log-level` for `run.py train`, `compile`,
`compile-generate`, `generate` and `score`."""

from __future__ import annotations

import logging

LOG_LEVEL_HELP = "INFO (default), DEBUG (also prints the traceback of an error), WARNING, ..."


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(text: str) -> str:
    """--log-level's type: a level name of `LOG_LEVELS`, any case (a misspelt one was taken as INFO)."""
    import argparse

    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def setup_logging(level: str) -> None:
    # force: a handler that an import put on the root logger first (absl's, through jax: the
    # compile parser's help text imports train.aot) made this a no-op, and INFO lines vanished.
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
