"""``nemo-gdro`` command line: ``train | eval | export | plot`` (NeMo/Hydra-style overrides)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-gdro",
        description="GDRO, DynaMO and R2VPO for GRPO-style RL post-training on Megatron-Core.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of configuration errors")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,export,plot}")
    for name, help_text in (
        ("train", "run RL training (default config: tiny model on CPU)"),
        ("eval", "evaluate a training checkpoint, run dir or HF checkpoint dir on the task's eval suites"),
        ("plot", "render the plots of a finished run"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        if name == "plot":
            cmd.add_argument("run_dir", help="a run's output dir (metrics.jsonl, eval.jsonl)")
            continue
        if name == "train":
            cmd.add_argument(
                "--validate-only",
                action="store_true",
                help="compose, type and check the config and the input files (headers), build nothing, "
                "print one OK line; exit 0, or 2 with the one-line error",
            )
            cmd.add_argument(
                "--world-size",
                type=_positive_int,
                default=None,
                metavar="N",
                help="with --validate-only: the number of processes the job will start (default: SLURM_NTASKS "
                "when set, else this process's launcher's)",
            )
        if name == "eval":
            cmd.add_argument("target", help="a run's output dir, a checkpoints/step_XXXXXXXX dir, or an HF checkpoint dir")
            cmd.add_argument("--out", default=None, help="also write the metrics as JSON to this file")
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
    export.add_argument(
        "out_dir",
        help="a new or empty directory for the HF checkpoint (written to a temp sibling, then renamed into place); "
        "never a run directory, anything inside one, or the checkpoint itself",
    )
    export.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="stored dtype (default: the run's model.dtype)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace out_dir if it holds an HF checkpoint (a previous export) and nothing else")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _validate_world_size(args: argparse.Namespace) -> int | None:
    """The process count a validate-only run checks the layout against.

    A batch script runs outside the job step, where the launcher variables
    describe one process; the job's task count is ``SLURM_NTASKS``.
    """
    import os

    if args.world_size is not None:
        return args.world_size
    ntasks = os.environ.get("SLURM_NTASKS", "").strip()
    return int(ntasks) if ntasks.isdigit() and int(ntasks) > 0 else None


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


def _one_line(err: object) -> str:
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def _train(args: argparse.Namespace) -> int:
    """``nemo-gdro train``: every expected failure is one line on stderr and a non-zero exit code.

    2: a configuration problem (nothing was built or written); 1: a run-time
    failure (lock held, non-finite values, disk full, a collective timed out,
    a checkpoint that cannot be used); 128 + N: stopped by signal N (SIGTERM:
    143, SIGINT: 130) after writing a checkpoint. ``--debug`` re-raises.
    """
    from nemo_gdro.trainer.config import ConfigError, load
    from nemo_gdro.trainer.errors import CheckpointError, RunError
    from nemo_gdro.trainer.preflight import check_launch

    validate_only = getattr(args, "validate_only", False)
    if getattr(args, "world_size", None) is not None and not validate_only:
        # A real launch's world size is its launcher's; a number given here would be checked and then ignored.
        print("nemo-gdro train: --world-size applies to --validate-only only", file=sys.stderr)
        return 2
    try:
        # The whole config is typed and checked before torch and Megatron are imported
        # (seconds): a bad value is answered at once, and nothing is built or written.
        run_config = load(args.config_name, args.overrides)
        world_size = _validate_world_size(args) if validate_only else None
        check_launch(run_config, world_size=world_size)
        if validate_only:
            from nemo_gdro.trainer.input_check import describe_inputs

            procs = f"{world_size} process(es)" if world_size is not None else "this launch"
            print(f"nemo-gdro train: configuration OK for {procs} ({describe_inputs(run_config)})")
            return 0
        from nemo_gdro.trainer.loop import train_config

        train_config(run_config)
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
    if args.command == "eval":
        from nemo_gdro.trainer.checkpoint import CheckpointError
        from nemo_gdro.trainer.config import ConfigError
        from nemo_gdro.trainer.eval_run import evaluate_target, format_table, write_json

        from nemo_gdro.trainer.errors import RunError

        try:
            metrics = evaluate_target(args.target, args.overrides, config_name=args.config_name)
        except (CheckpointError, ConfigError, FileNotFoundError, ValueError, KeyError) as err:
            if args.debug:
                raise
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"nemo-gdro eval: {_one_line(message)}", file=sys.stderr)
            return 2
        except (RunError, OSError) as err:  # a run-time failure (a worker, the disk): nothing was written
            if args.debug:
                raise
            print(f"nemo-gdro eval: {_one_line(err)}", file=sys.stderr)
            return getattr(err, "exit_code", 1)
        k = max(int(key.rsplit("@", 1)[1]) for key in metrics if key.startswith("eval/pass@") and "/" not in key[5:])
        print(format_table(metrics, k))
        if args.out:
            try:
                write_json(args.out, metrics)
            except OSError as err:
                print(f"nemo-gdro eval: cannot write --out {args.out}: {err.strerror or err}", file=sys.stderr)
                return 1
        return 0
    if args.command == "export":
        from nemo_gdro.trainer.checkpoint import CheckpointError
        from nemo_gdro.trainer.config import ConfigError
        from nemo_gdro.trainer.hf_out import export_checkpoint

        try:
            out = export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
        except (CheckpointError, ConfigError, FileNotFoundError, ValueError, KeyError, OSError) as err:
            if args.debug:
                raise
            # A failure while writing (disk full, a file vanished) is a run-time error; the rest is input.
            code = 1 if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, FileExistsError)) else 2
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"nemo-gdro export: {_one_line(message)}", file=sys.stderr)
            return code
        print(f"[nemo-gdro] wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
        return 0
    if args.command == "plot":
        from nemo_gdro.trainer.plots import make_plots, write_summary

        run_dir = Path(args.run_dir)
        if not (run_dir / "metrics.jsonl").is_file():
            print(f"nemo-gdro plot: {run_dir} holds no metrics.jsonl (not a training run's output dir)", file=sys.stderr)
            return 2
        plots = make_plots(run_dir)
        print(f"[nemo-gdro] {len(plots)} plots in {run_dir / 'plots'}; summary: {write_summary(run_dir)}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
