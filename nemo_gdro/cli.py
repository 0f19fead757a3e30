"""``nemo-gdro`` command line: ``train | eval | plot`` (NeMo/Hydra-style overrides)."""

from __future__ import annotations

import argparse
import sys

NOT_YET = (
    "nemo-gdro {command}: not yet available. The training loop (Megatron-Core actor, "
    "rollout engine, verifier, checkpoints) lands with issue #3; today the package "
    "ships the framework-free algorithm core in nemo_gdro.algorithms "
    "(`make test` checks it, `make bench` times it)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-gdro",
        description="GDRO, DynaMO and R2VPO for GRPO-style RL post-training on Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,plot}")
    for name, help_text in (
        ("train", "run RL training (default config: tiny model on CPU)"),
        ("eval", "evaluate a checkpoint (mean@k, pass@k)"),
        ("plot", "render the plots of a finished run"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument(
            "overrides",
            nargs="*",
            help="config overrides: key=value, +key=value (add), ++key=value (add or replace)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(NOT_YET.format(command=args.command), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
