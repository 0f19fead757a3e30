"""``nemo-gdro`` command line: ``train | eval | plot`` (NeMo/Hydra-style overrides)."""

from __future__ import annotations

import argparse
import sys

NOT_YET = (
    "nemo-gdro {command}: not yet available; it lands with a later issue. "
    "`nemo-gdro train` runs training and writes plots and an eval summary at the end."
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
            "--config-name",
            default="train",
            help="config file under nemo_gdro/conf/ (without .yaml); default: train (the tiny CPU run)",
        )
        cmd.add_argument(
            "overrides",
            nargs="*",
            help="config overrides: key=value, +key=value (add), ++key=value (add or replace)",
        )
    return parser


def _quiet_third_party_warnings() -> None:
    """Megatron-Core and torch.jit emit deprecation notices on every import and
    layer build; they say nothing about the user's run."""
    import warnings

    for module in ("megatron", "torch.jit", "torch.distributed"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    # Fallback notices (no Transformer Engine / Apex) are expected on CPU.
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", message="Apex is not installed")


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "train":
        from nemo_gdro.trainer.config import ConfigError
        from nemo_gdro.trainer.loop import train

        try:
            train(args.overrides, config_name=args.config_name)
        except ConfigError as err:
            print(f"nemo-gdro train: configuration error: {err}", file=sys.stderr)
            return 2
        return 0
    print(NOT_YET.format(command=args.command), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
