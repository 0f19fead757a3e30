"""TRL's side of ``benchmarks/vs_trl.py``: ``GRPOTrainer`` on the benchmark's checkpoint and prompts.

Runs in TRL's own virtualenv (``make setup-trl`` -> ``.venv-trl``), never in the
package's. The settings mirror the nemo_gdro run that ``vs_trl.py`` starts:
one optimizer step per generation batch (``num_iterations=1``, gradient
accumulation = rows / micro-batch), micro-batches of ``--micro-batch`` rows, no
KL (``beta=0``), fp32 on CPU, HF ``generate`` (no vLLM), DAPO's clip range and
token-mean loss, the same reward: nemo_gdro's ``dapo_math`` verifier, imported
from this source tree and called in-process.

Timers (wall clock, ``time.perf_counter``), written one JSON line per optimizer step to ``--out``:

* ``step_s``: from the previous step's end (the start of training for the first)
  to this step's ``on_step_end`` callback: everything TRL does for the step;
* ``generate_s``: time inside ``GRPOTrainer._generate_single_turn`` (the
  ``model.generate`` call over the whole generation batch, with its padding and
  EOS masking);
* ``score_s``: time inside ``_generate_and_score_completions`` (generation,
  reward, advantages and any log-prob pass before training);
* ``train_s`` = ``step_s - generate_s`` (the rest of the step, as for nemo_gdro);
* ``tokens``: generated tokens (up to and including the first EOS), from the
  completions ``_generate_single_turn`` returned.

Usage: ``.venv-trl/bin/python benchmarks/trl_driver.py --model DIR --prompts FILE.jsonl --out steps.jsonl ...``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the verifier and prompt text come from this checkout, not an install


def load_prompts(path: Path) -> tuple[list[str], list[str]]:
    """The prompt texts nemo_gdro builds for ``data.prompt_format=raw data.instruction=dapo``, and the answers."""
    from nemo_gdro.data.prompt_format import apply_instruction

    prompts, answers = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            prompts.append(apply_instruction(row["prompt"][0]["content"], "dapo"))
            answers.append(str(row["reward_model"]["ground_truth"]))
    return prompts, answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory (tiny_hf)")
    p.add_argument("--prompts", required=True, type=Path, help="DAPO-layout JSONL rows")
    p.add_argument("--out", required=True, type=Path, help="per-step JSON lines written here")
    p.add_argument("--work-dir", required=True, type=Path, help="TRL's output_dir (nothing is saved)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nemo_gdro.rewards.math import DapoMathVerifier

    rows = args.prompts_per_step * args.rollouts
    if rows % args.micro_batch:
        raise SystemExit(f"--prompts-per-step x --rollouts = {rows} rows is not a multiple of --micro-batch {args.micro_batch}")
    prompts, answers = load_prompts(args.prompts)
    dataset = Dataset.from_dict({"prompt": prompts, "answer": answers})
    verifier = DapoMathVerifier(correct_reward=1.0, wrong_reward=0.0)

    def dapo_math_reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
        return [verifier.score(c, a) for c, a in zip(completions, answer, strict=True)]

    config = GRPOConfig(
        output_dir=str(args.work_dir),
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=rows // args.micro_batch,  # one optimizer step per generation batch
        num_generations=args.rollouts,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        num_iterations=1,
        beta=0.0,  # no KL reference (nemo_gdro: algorithm.policy_loss.kl_coef=0, no reference model)
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",  # token-mean over the batch, as nemo_gdro's loss_agg_mode=token-mean
        scale_rewards="group",
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        model_init_kwargs={"dtype": torch.float32},
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(
        model=args.model,
        reward_funcs=dapo_math_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )

    acc = {"generate_s": 0.0, "score_s": 0.0, "tokens": 0}

    def timed(name: str, fn):  # wraps a bound method, adding its wall time to acc[name]
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            acc[name] += time.perf_counter() - t0
            if name == "generate_s":
                acc["tokens"] += sum(len(c) for c in out[0])
            return out

        return wrapper

    trainer._generate_single_turn = timed("generate_s", trainer._generate_single_turn)
    trainer._generate_and_score_completions = timed("score_s", trainer._generate_and_score_completions)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = open(args.out, "w", encoding="utf-8")

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, _args, state, *a, **kw):
            now = time.perf_counter()
            step_s, self.t = now - self.t, now
            record = {"step": state.global_step, "step_s": step_s, **acc, "train_s": step_s - acc["generate_s"]}
            out.write(json.dumps(record) + "\n")
            out.flush()
            acc.update(generate_s=0.0, score_s=0.0, tokens=0)

    trainer.add_callback(StepTimer())
    trainer.train()
    out.close()
    print(f"[trl_driver] {args.steps} steps -> {args.out} (torch threads {torch.get_num_threads()})", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
