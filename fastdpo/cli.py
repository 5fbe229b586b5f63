"""The ``fastdpo`` command. Subcommands arrive with the features behind them."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdpo",
        description="Fused, memory-lean log-probabilities for DPO-family preference fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"fastdpo {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
