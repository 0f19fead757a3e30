"""``nemo-gdro`` command line: ``train | eval | export | plot`` (NeMo/Hydra-style overrides)."""

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
    parser.add_argument("--debug", action="store_true", help="show the full traceback of configuration errors")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,export,plot}")
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
    export = sub.add_parser("export", help="convert a training checkpoint to a Hugging Face checkpoint directory")
    export.add_argument("checkpoint", help="a run's output dir (newest checkpoint) or one checkpoints/step_XXXXXXXX dir")
    export.add_argument("out_dir", help="where to write the HF directory (replaced atomically)")
    export.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="stored dtype (default: the run's model.dtype)")
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


def _one_line(err: BaseException) -> str:
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def _train(args: argparse.Namespace) -> int:
    """``nemo-gdro train``: every expected failure is one line on stderr and a non-zero exit code.

    2: a configuration problem (nothing was built or written); 1: a run-time
    failure (lock held, non-finite values, disk full, a collective timed out,
    a checkpoint that cannot be used); 128 + N: stopped by signal N (SIGTERM:
    143, SIGINT: 130) after writing a checkpoint. ``--debug`` re-raises.
    """
    from nemo_gdro.trainer.checkpoint import CheckpointError
    from nemo_gdro.trainer.config import ConfigError
    from nemo_gdro.trainer.errors import RunError
    from nemo_gdro.trainer.loop import train

    try:
        train(args.overrides, config_name=args.config_name)
    except ConfigError as err:
        if args.debug:
            raise
        print(f"nemo-gdro train: configuration error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (RunError, CheckpointError) as err:
        if args.debug:
            raise
        print(f"nemo-gdro train: {_one_line(err)}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("nemo-gdro train: interrupted (SIGINT) before training started; nothing was written", file=sys.stderr)
        return 130
    return 0


def _short_warnings() -> None:
    """Warnings as one ``[nemo-gdro] <Category>: <message>`` line (no source line echo)."""
    import warnings

    def fmt(message, category, filename, lineno, line=None):
        return f"[nemo-gdro] {category.__name__}: {message}\n"

    warnings.formatwarning = fmt


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party_warnings()
    _short_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "train":
        return _train(args)
    if args.command == "export":
        from nemo_gdro.trainer.checkpoint import CheckpointError
        from nemo_gdro.trainer.config import ConfigError
        from nemo_gdro.trainer.hf_out import export_checkpoint

        try:
            out = export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype)
        except (CheckpointError, ConfigError, FileNotFoundError, ValueError, KeyError) as err:
            if args.debug:
                raise
            print(f"nemo-gdro export: {err}", file=sys.stderr)
            return 2
        print(f"[nemo-gdro] wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
        return 0
    print(NOT_YET.format(command=args.command), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
