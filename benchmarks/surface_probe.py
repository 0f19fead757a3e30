"""Hostile-user probe of the real-task surface (README, "Reliability"): export, eval, HF weights,
data files, resume and ``train_8b.sh``'s input checks, each case run for real through the CLI.

    python benchmarks/surface_probe.py [--groups export,eval,...] [--out DIR] [--json]

The sibling of ``benchmarks/faults.py`` (which kills and corrupts running jobs). It builds
tiny real assets once (an arithmetic run with checkpoints, a tiny random Qwen3 with the real
tokenizer, DAPO-Math and MATH-500 files, a math run trained from a relative model path),
then runs every case as a user would (``python -m nemo_gdro.cli ...`` or
``bash scripts/slurm/train_8b.sh`` in a stand-in Slurm job environment) and sorts the outcome:

- ``held``: what the case expects. A refusal is exit 2 with one stderr line naming the
  problem (file, tensor, key, row); a valid request exits 0 and does what it says;
- ``lost``: a protected file (a run's checkpoints, metrics, a user's file) changed or vanished;
- ``traceback``: a Python traceback without ``--debug``;
- ``silent_wrong``: exit 0 where a refusal was due, or a valid request that did the wrong thing;
- ``refused_valid``: a valid request that failed;
- ``wrong_cause``: a refusal that does not name the problem, or is more than one line.

Prints one line per case and the totals; exit 0 only if every case held.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCRIPT = REPO / "scripts" / "slurm" / "train_8b.sh"
SRUN_MARK = "[stand-in srun] arguments:"
VERDICTS = ("held", "lost", "traceback", "silent_wrong", "refused_valid", "wrong_cause")

#: The tiny arithmetic run every export / eval case starts from (seconds on one core).
ARITH_ARGS = [
    "sft.steps=0", "data.num_train=32", "data.num_eval=2", "trainer.prompts_per_step=4", "rollout.n=4", "eval.k=1",
    "rollout.max_new_tokens=3", "trainer.eval_every=0", "trainer.checkpoint_every=1", "trainer.max_steps=2",
    "trainer.micro_batch_size=8", "logging.tensorboard=false", "logging.progress=false",
]


def math_args(model: str, train: str, math500: str, out: str, *extra: str) -> list[str]:
    """The Qwen3-0.6B DAPO-Math recipe on tiny assets, shrunk to seconds (HF engine)."""
    return [
        "+recipe=qwen3_0p6b_dapo", f"model.path={model}", "model.dtype=float32", "rollout.engine=hf",
        f"data.train_files=[{train}]", f"+data.eval_files.math500=[{math500}]", "reward.num_workers=1",
        "trainer.max_steps=1", "trainer.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=6",
        "eval.k=1", "trainer.micro_batch_size=8", "trainer.eval_every=0", "trainer.checkpoint_every=1",
        "logging.tensorboard=false", "logging.progress=false", f"run.output_dir={out}", *extra,
    ]


@dataclass
class Case:
    group: str
    name: str
    argv: list[str]
    expect: str  # "refuse" | "ok" | "reaches_srun" (train_8b.sh: every check passed, the next command is srun)
    names: tuple[str, ...] = ()  # what the refusal (or, for "ok", stdout+stderr) must contain
    protect: tuple[Path, ...] = ()
    cwd: Path | None = None
    env: dict[str, str] | None = None
    setup: Callable[[], None] | None = None
    check: Callable[[subprocess.CompletedProcess], str | None] | None = None  # "ok" cases: None or what is wrong


@dataclass
class Outcome:
    case: Case
    verdict: str
    rc: int
    seconds: float
    detail: str = ""


def tree_digest(path: Path) -> str:
    """Names and contents of every file under ``path`` (or of the file itself); 'absent' if gone."""
    if not path.exists():
        return "absent"
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".lock")
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nemo_gdro.cli", *args]


def run_case(case: Case, timeout: float = 600.0) -> Outcome:
    if case.setup is not None:
        try:
            case.setup()
        except Exception as err:  # noqa: BLE001 - a setup that fails is a refused valid step, reported
            return Outcome(case, "refused_valid", -1, 0.0, f"setup: {' '.join(str(err).split())[:200]}")
    before = {p: tree_digest(p) for p in case.protect}
    env = {**os.environ, "PYTHONPATH": str(REPO), **(case.env or {})}
    t0 = time.monotonic()
    try:
        r = subprocess.run(case.argv, cwd=case.cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(case, "silent_wrong", -1, time.monotonic() - t0, f"hung past {timeout:.0f} s")
    seconds = time.monotonic() - t0
    changed = [str(p) for p in case.protect if tree_digest(p) != before[p]]
    err_lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("[nemo-gdro]")]
    last = err_lines[-1] if err_lines else ""
    if changed:
        return Outcome(case, "lost", r.returncode, seconds, "changed: " + ", ".join(changed))
    if "Traceback (most recent call last)" in r.stderr + r.stdout:
        return Outcome(case, "traceback", r.returncode, seconds, last)
    if case.expect == "reaches_srun":
        # The stand-in job environment's srun only records its arguments (one per line) and exits 3.
        if r.returncode == 3 and SRUN_MARK in r.stderr and "train_8b.sh:" not in r.stderr:
            args = r.stderr.split(SRUN_MARK, 1)[1].splitlines()
            wrong = [n for n in case.names if not any(n in arg for arg in args)]
            if wrong:
                return Outcome(case, "silent_wrong", r.returncode, seconds, f"srun arguments lack {wrong}")
            return Outcome(case, "held", r.returncode, seconds, "checks passed; srun got the path as one argument")
        return Outcome(case, "refused_valid", r.returncode, seconds, last[:200])
    if case.expect == "refuse":
        if SRUN_MARK in r.stderr:
            return Outcome(case, "silent_wrong", r.returncode, seconds, "train_8b.sh went on to srun")
        if r.returncode == 0:
            return Outcome(case, "silent_wrong", 0, seconds, "exit 0: " + (r.stdout.strip().splitlines() or [""])[-1])
        missing = [n for n in case.names if n not in r.stderr]
        is_script = case.argv[0] == "bash"
        if r.returncode != 2 or missing or (not is_script and len(err_lines) != 1):
            why = f"rc {r.returncode}; missing {missing}" if missing else f"rc {r.returncode}, {len(err_lines)} lines"
            return Outcome(case, "wrong_cause", r.returncode, seconds, f"{why}: {last[:200]}")
        return Outcome(case, "held", r.returncode, seconds, last[:160])
    if r.returncode != 0:
        return Outcome(case, "refused_valid", r.returncode, seconds, last[:200])
    missing = [n for n in case.names if n not in r.stdout + r.stderr]
    wrong = case.check(r) if case.check else None
    if missing or wrong:
        return Outcome(case, "silent_wrong", 0, seconds, wrong or f"output lacks {missing}")
    return Outcome(case, "held", 0, seconds, (r.stdout.strip().splitlines() or [""])[-1][:160])


# ----------------------------------------------------------------------------- assets


@dataclass
class Assets:
    root: Path
    arith_run: Path
    hf: Path
    train_parquet: Path
    train_jsonl: Path
    math500: Path
    math_run: Path
    extra: dict[str, Path] = field(default_factory=dict)

    @property
    def arith_step(self) -> Path:
        return sorted((self.arith_run / "checkpoints").glob("step_*"))[-1]


def _must(cmd: list[str], cwd: Path, what: str) -> None:
    r = subprocess.run(cmd, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")


def build_assets(root: Path) -> Assets:
    from nemo_gdro.testing.tiny_hf import build_tiny_hf
    from tests.data.fixtures import write_benchmark, write_dapo_math

    root.mkdir(parents=True, exist_ok=True)
    arith = root / "arith_run"
    _must(cli("train", *ARITH_ARGS, f"run.output_dir={arith}"), root, "the arithmetic run")
    hf = build_tiny_hf(root / "qwen3", arch="qwen3", seed=5)
    info = write_dapo_math(root / "data" / "dapo.parquet", num_prompts=8, repeats=2, cjk_prompts=0)
    jsonl = write_dapo_math(root / "data" / "dapo.jsonl", num_prompts=8, repeats=2, cjk_prompts=0, fmt="jsonl").path
    math500 = write_benchmark("math500", root / "data" / "math500.jsonl", num=3).path
    # The math run starts from a copy of the model given by a relative path; the copy is deleted
    # later (export must then use the tokenizer files kept with the checkpoint).
    shutil.copytree(hf, root / "model_copy")
    math_run = root / "math_run"
    _must(cli("train", *math_args("model_copy", "data/dapo.parquet", "data/math500.jsonl", "math_run")), root,
          "the math run")
    return Assets(root, arith, hf, info.path, jsonl, math500, math_run)


# ----------------------------------------------------------------------------- cases


def _damaged(a: Assets, name: str, damage: Callable[[Path], None]) -> Path:
    d = a.root / "damaged" / name
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(a.hf, d)
    damage(d)
    return d


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a safetensors header (same data bytes) after ``edit`` changed its JSON."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def _drop_tensor(path: Path, suffix: str) -> None:
    """Remove the first tensor named ``*suffix`` from a safetensors file: its header entry and its bytes,
    the other tensors' offsets shifted (a well-formed file that lacks one tensor)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    name = _first_layer_tensor(header, suffix)
    start, end = header.pop(name)["data_offsets"]
    for key, entry in header.items():
        if key != "__metadata__" and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [entry["data_offsets"][0] - (end - start), entry["data_offsets"][1] - (end - start)]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + data[:start] + data[end:])


def _first_layer_tensor(header: dict, suffix: str) -> str:
    return next(k for k in header if k.endswith(suffix))


def weight_cases(a: Assets) -> list[Case]:
    def case(name: str, damage: Callable[[Path], None], names: Callable[[Path], tuple[str, ...]]) -> Case:
        d = _damaged(a, name, damage)
        out = a.root / "weights_runs" / name
        return Case("weights", name, cli("train", *math_args(str(d), str(a.train_parquet), str(a.math500), str(out))),
                    "refuse", names(d), check=None)

    def drop_shard(d: Path) -> None:
        _shards(d)[-1].unlink()

    def truncate(d: Path) -> None:
        s = _shards(d)[-1]
        s.write_bytes(s.read_bytes()[: s.stat().st_size // 2])

    def bad_index(d: Path) -> None:
        (d / "model.safetensors.index.json").write_text('{"weight_map": {"model.embed_tokens.weight": ')

    def header_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
        return lambda d: _rewrite_header(_shards(d)[-1], edit)

    def wrong_shape(h: dict) -> None:
        k = _first_layer_tensor(h, "input_layernorm.weight")
        n = h[k]["shape"][0]
        h[k]["shape"] = [n // 2, 2]

    def wrong_dtype(h: dict) -> None:
        h[_first_layer_tensor(h, "input_layernorm.weight")]["dtype"] = "I32"


    def extra(h: dict) -> None:
        k = _first_layer_tensor(h, "input_layernorm.weight")
        h["model.layers.0.mystery.weight"] = dict(h[k])

    def no_tokenizer(d: Path) -> None:
        for p in d.glob("tokenizer*"):
            p.unlink()
        for name in ("vocab.json", "merges.txt"):
            (d / name).unlink(missing_ok=True)

    def no_weights(d: Path) -> None:
        for p in _shards(d):
            p.unlink()
        (d / "model.safetensors.index.json").unlink(missing_ok=True)

    last = lambda d: _shards(a.hf)[-1].name  # noqa: E731
    return [
        case("missing shard", drop_shard, lambda d: (last(d),)),
        case("truncated shard", truncate, lambda d: (last(d),)),
        case("bad index", bad_index, lambda d: ("model.safetensors.index.json",)),
        case("wrong shape", header_edit(wrong_shape), lambda d: ("input_layernorm.weight",)),
        case("wrong dtype", header_edit(wrong_dtype), lambda d: ("input_layernorm.weight",)),
        case("missing tensor", lambda d: _drop_tensor(_shards(d)[-1], "post_attention_layernorm.weight"),
             lambda d: ("post_attention_layernorm.weight",)),
        case("extra tensor", header_edit(extra), lambda d: ("mystery.weight",)),
        case("no tokenizer files", no_tokenizer, lambda d: ("tokenizer",)),
        case("no weights", no_weights, lambda d: ("safetensors",)),
    ]


def export_cases(a: Assets) -> list[Case]:
    run, step = a.arith_run, a.arith_step
    pristine = a.root / "arith_run_pristine"
    if not pristine.exists():
        shutil.copytree(run, pristine)

    def restore(then: Callable[[], None] | None = None) -> Callable[[], None]:
        """Every case starts from the same run (a case that loses data must not spoil the next)."""

        def setup() -> None:
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(pristine, run)
            if then is not None:
                then()

        return setup
    user_dir = a.root / "user_dir"
    user_dir.mkdir(exist_ok=True)
    (user_dir / "notes.txt").write_text("a user's file\n")
    a_file = a.root / "a_file.txt"
    a_file.write_text("not a directory\n")
    prev = a.root / "prev_export"

    def has_weights(out: Path) -> Callable[[subprocess.CompletedProcess], str | None]:
        return lambda r: None if (out / "config.json").is_file() and list(out.glob("*.safetensors")) else f"{out} has no HF weights"

    def fresh_export() -> None:
        shutil.rmtree(prev, ignore_errors=True)
        _must(cli("export", str(run), str(prev)), a.root, "a first export")

    math_out = a.root / "math_export"
    other_cwd = a.root / "elsewhere"
    other_cwd.mkdir(exist_ok=True)

    def drop_model_copy() -> None:
        shutil.rmtree(a.root / "model_copy", ignore_errors=True)
        shutil.rmtree(math_out, ignore_errors=True)

    return [
        Case("export", "into the run dir", cli("export", str(run), str(run)), "refuse", (str(run),), protect=(run,), setup=restore()),
        Case("export", "into checkpoints/", cli("export", str(run), str(run / "checkpoints")), "refuse", ("checkpoints",),
             protect=(run,), setup=restore()),
        Case("export", "into the step dir", cli("export", str(step), str(step)), "refuse", (step.name,), protect=(run,), setup=restore()),
        Case("export", "into a new dir inside the run", cli("export", str(run), str(run / "hf_new")), "refuse",
             (str(run),), protect=(run,), setup=restore()),
        Case("export", "over a user's non-empty dir", cli("export", str(run), str(user_dir)), "refuse", (str(user_dir),),
             protect=(user_dir, run), setup=restore()),
        Case("export", "onto a file", cli("export", str(run), str(a_file)), "refuse", (str(a_file),), protect=(a_file,), setup=restore()),
        Case("export", "under a file", cli("export", str(run), str(a_file / "out")), "refuse", (str(a_file),),
             protect=(a_file,), setup=restore()),
        Case("export", "over a previous export, no --overwrite", cli("export", str(run), str(prev)), "refuse",
             ("--overwrite",), protect=(prev,), setup=restore(fresh_export)),
        Case("export", "over a previous export with --overwrite", cli("export", "--overwrite", str(run), str(prev)), "ok",
             protect=(run,), check=has_weights(prev), setup=restore()),
        Case("export", "relative model.path, another cwd, model folder gone",
             cli("export", str(a.math_run), str(math_out)), "ok", protect=(a.math_run,), cwd=other_cwd,
             setup=restore(drop_model_copy), check=has_weights(math_out)),
    ]


def eval_cases(a: Assets) -> list[Case]:
    locked = a.arith_run  # the run's saved config names its own output dir: lock that one, not a copy

    def hold_lock() -> None:
        # A live writer: a process that holds the run's lock for the duration of the case.
        code = (
            "import time; from nemo_gdro.trainer.run_lock import RunLock; "
            f"lock = RunLock({str(locked)!r}); print('locked', flush=True); time.sleep(600)"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        a.extra["lock_holder_pid"] = Path(str(proc.pid))

    hf_eval = cli("eval", str(a.hf))
    return [
        Case("eval", "HF dir with the default (arithmetic, char tokenizer) config", hf_eval, "refuse", ("data",)),
        Case("eval", "HF dir with a math task", cli("eval", str(a.hf), "data=math", f"data.train_files=[{a.train_parquet}]",
             f"+data.eval_files.math500=[{a.math500}]", "reward.verifier=dapo_math", "eval.k=1",
             "rollout.max_new_tokens=4"), "ok", ("math500",)),
        Case("eval", "a run that is still training (lock held)", cli("eval", str(locked)), "ok", ("pooled",),
             protect=(locked,), setup=hold_lock),
    ]


def resume_cases(a: Assets) -> list[Case]:
    base = math_args("model_copy2", "data/dapo.parquet", "data/math500.jsonl", "resume_run")

    def restore_model() -> None:
        if not (a.root / "model_copy2").exists():
            shutil.copytree(a.hf, a.root / "model_copy2")
        shutil.rmtree(a.root / "resume_run", ignore_errors=True)
        _must(cli("train", *base), a.root, "the run to resume")

    def steps(n: int) -> Callable[[subprocess.CompletedProcess], str | None]:
        def check(_: subprocess.CompletedProcess) -> str | None:
            got = sorted(p.name for p in (a.root / "resume_run" / "checkpoints").glob("step_*"))
            return None if got and got[-1] == f"step_{n:08d}" else f"newest checkpoint {got[-1:]} (want step {n})"

        return check

    same_abs = [x.replace("data/dapo.parquet", str(a.train_parquet)) for x in base]
    as_jsonl = [x.replace("data/dapo.parquet", str(a.train_jsonl)) for x in base]
    changed_rows = a.root / "data" / "dapo_changed.parquet"
    from tests.data.fixtures import write_dapo_math

    write_dapo_math(changed_rows, num_prompts=9, repeats=2, cjk_prompts=0)
    changed = [x.replace("data/dapo.parquet", str(changed_rows)) for x in base]
    return [
        Case("resume", "same data by an absolute path", cli("train", *same_abs, "trainer.max_steps=2"), "ok",
             setup=restore_model, cwd=a.root, check=steps(2)),
        Case("resume", "same rows as JSONL", cli("train", *as_jsonl, "trainer.max_steps=3"), "ok", cwd=a.root,
             check=steps(3)),
        Case("resume", "changed data", cli("train", *changed, "trainer.max_steps=4"), "refuse", ("data",), cwd=a.root,
             protect=(a.root / "resume_run" / "checkpoints",)),
        Case("resume", "switch on R2VPO with allow_config_change",
             cli("train", *base, "trainer.max_steps=4", "algorithm.loss=r2vpo", "run.allow_config_change=[algorithm]"),
             "ok", ("r2vpo",), cwd=a.root, check=steps(4)),
    ]


def default_cases(a: Assets) -> list[Case]:
    no_eval = [x for x in math_args(str(a.hf), str(a.train_parquet), str(a.math500), str(a.root / "no_eval"))
               if not x.startswith("+data.eval_files")]
    return [
        Case("defaults", "math task without eval suites", cli("train", *no_eval, "trainer.eval_every=1"), "ok",
             ("data.eval_files",)),
        Case("defaults", "micro-batch token budget below one row",
             cli("train", *math_args(str(a.hf), str(a.train_parquet), str(a.math500), str(a.root / "mtpm")),
                 "trainer.max_tokens_per_microbatch=16"), "refuse", ("trainer.max_tokens_per_microbatch",)),
    ]


def data_cases(a: Assets) -> list[Case]:
    bad = a.root / "bad_data"
    bad.mkdir(exist_ok=True)
    lines = a.train_jsonl.read_text(encoding="utf-8").splitlines()
    latin = bad / "latin1.jsonl"
    latin.write_bytes(("\n".join(lines[:3]) + "\n").encode() + lines[3].encode().replace(b"Problem", b"Probl\xe9m") + b"\n")
    broken = bad / "broken.jsonl"
    broken.write_text("\n".join(lines[:4] + [lines[4][:-5]] + lines[5:]) + "\n")
    from tests.data.fixtures import write_benchmark

    gpqa = write_benchmark("gpqa_diamond", bad / "gpqa_diamond.csv", num=3, fmt="csv").path
    import csv

    with open(gpqa, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    wrong = [k for k in header if k.startswith("Incorrect Answer")][0]
    rows[1][wrong] = rows[1]["Correct Answer"]
    with open(gpqa, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)

    def train_on(path: Path) -> list[str]:
        return cli("train", *math_args(str(a.hf), str(path), str(a.math500), str(a.root / "data_runs" / path.stem)))

    return [
        Case("data", "non-UTF-8 byte", train_on(latin), "refuse", ("latin1.jsonl", "line 4")),
        Case("data", "broken JSON line", train_on(broken), "refuse", ("broken.jsonl", "line 5")),
        Case("data", "multiple-choice row with repeated choices",
             cli("train", *math_args(str(a.hf), str(a.train_parquet), str(a.math500), str(a.root / "data_runs" / "gpqa")),
                 f"+data.eval_files.gpqa_diamond=[{gpqa}]"), "refuse", ("gpqa_diamond.csv", "row 1")),  # 0-based data row
    ]


def sbatch_cases(a: Assets) -> list[Case]:
    base_env = {
        # A 4-task job (the 8B recipe's TP=4) with the HF engine: this machine has no vLLM to check against.
        "SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "NEMO_GDRO_CONFIG_OVERRIDES": "rollout.engine=hf", "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(REPO),
        "NEMO_GDRO_PYTHON": sys.executable, "MODEL_PATH": str(a.hf), "TRAIN_FILES": str(a.train_parquet),
        "EVAL_FILES": f"math500={a.math500}",
    }
    # srun must never run in the stand-in job: the first srun on PATH records its arguments and exits 3.
    bin_dir = a.root / "standin_bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(f'#!/bin/sh\necho "{SRUN_MARK}" >&2\nfor a in "$@"; do echo "$a" >&2; done\nexit 3\n')
    srun.chmod(0o755)
    base_env["PATH"] = f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    spaced = a.root / "data with space"
    spaced.mkdir(exist_ok=True)
    shutil.copy(a.train_parquet, spaced / "dapo copy.parquet")
    txt = a.root / "data" / "train.txt"
    txt.write_text("not a data file\n")
    weightless = _damaged(a, "sbatch no weights", lambda d: [p.unlink() for p in _shards(d)])

    def script(**env: str) -> tuple[list[str], dict[str, str]]:
        return ["bash", str(SCRIPT)], {**base_env, **env}

    cases = []
    for name, env, names in [
        ("unknown benchmark", {"EVAL_FILES": f"math501={a.math500}"}, ("math501",)),
        ("unknown recipe", {"RECIPE": "qwen3_9b_dapo"}, ("qwen3_9b_dapo",)),
        ("model folder without weights", {"MODEL_PATH": str(weightless)}, ("safetensors",)),
        ("training file of an unsupported type", {"TRAIN_FILES": str(txt)}, ("train.txt",)),
    ]:
        argv, full_env = script(**env)
        cases.append(Case("sbatch", name, argv, "refuse", names, env=full_env, cwd=a.root))
    argv, env = script(TRAIN_FILES=str(spaced / "dapo copy.parquet"))
    cases.append(Case("sbatch", "a path with a space", argv, "reaches_srun", (str(spaced / "dapo copy.parquet"),),
                      env=env, cwd=a.root))
    # The tasks run in NEMO_GDRO_WORKDIR: a relative path means a file there, whatever the submit directory.
    argv, env = script(NEMO_GDRO_WORKDIR=str(a.root), TRAIN_FILES=str(a.train_parquet.relative_to(a.root)))
    cases.append(Case("sbatch", "a path relative to NEMO_GDRO_WORKDIR", argv, "reaches_srun", (str(a.train_parquet),),
                      env=env, cwd=REPO))
    argv, env = script(TRAIN_FILES=f"{a.train_parquet},")
    cases.append(Case("sbatch", "a stray comma in TRAIN_FILES", argv, "reaches_srun", (str(a.train_parquet),),
                      env=env, cwd=a.root))
    return cases


GROUPS: dict[str, Callable[[Assets], list[Case]]] = {
    "export": export_cases, "eval": eval_cases, "weights": weight_cases, "defaults": default_cases,
    "data": data_cases, "resume": resume_cases, "sbatch": sbatch_cases,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--out", type=Path, default=None, help="working directory (default: a temp dir, removed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    groups = [g for g in args.groups.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {unknown}; known: {', '.join(GROUPS)}")
    root = args.out or Path(tempfile.mkdtemp(prefix="nemo_gdro_surface_"))
    start = time.monotonic()
    totals = dict.fromkeys(VERDICTS, 0)
    results = []
    try:
        assets = build_assets(root)
        print(f"assets built in {time.monotonic() - start:.0f} s", flush=True)
        for group in groups:
            for case in GROUPS[group](assets):
                o = run_case(case)
                totals[o.verdict] += 1
                results.append({"group": group, "case": case.name, "verdict": o.verdict, "rc": o.rc,
                                "seconds": round(o.seconds, 1), "detail": o.detail})
                print(f"{group:8s} {case.name:55s} {o.verdict:13s} rc {o.rc:3d} {o.seconds:5.1f} s  {o.detail}", flush=True)
                pid = assets.extra.pop("lock_holder_pid", None)
                if pid is not None:
                    os.kill(int(str(pid)), 9)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - start
    print(f"cases {len(results)} / " + " / ".join(f"{k} {v}" for k, v in totals.items()) + f"  ({elapsed:.0f} s)")
    if args.json:
        print(json.dumps({"totals": totals, "cases": results, "seconds": round(elapsed, 1)}))
    return 0 if totals["held"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
