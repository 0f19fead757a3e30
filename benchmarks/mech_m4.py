"""M4 of the mechanism benchmark (issue 19): DynaMO's token modulation at a frozen policy.

    python benchmarks/mech_m4.py --run RUN_DIR --out benchmarks/results        # the full part
    python benchmarks/mech_m4.py --run RUN_DIR --out /tmp/m4 --quick           # a toy version

DynaMO's token-level claim (dynamo.md §2): ``A~ = A * beta_comp * beta_stab``
compensates confident correct tokens and brakes the tokens whose update would
move the policy entropy most. At the checkpoints ``t`` of one run, per
replicate on-policy batch (the run's ``P`` prompts x ``n`` rollouts from
``pi_t``, common random numbers: replicate ``j`` has the same prompts and
sampling seeds at every t), the clipped loss's gradient with
``algorithm.token_modulation=none`` and ``=dynamo`` (the real stage
:class:`~nemo_gdro.stages.modulation.DynamoModulation`, prepared on the
mini-batch's current-policy token statistics including ``ebar`` as the
trainer does, through the trainer's :class:`MinibatchLoss`), and paired
(dynamo - none):

1. the cosine of each gradient to the on-policy reference gradient (M3's:
   the same prompts, ``reference_rollouts`` fresh rollouts each);
2. the first-order predicted entropy change ``sum_t dH_t`` of the batch's
   update with ``A`` and with ``A~`` (dynamo.md §2: ``dH = -xi (u - Ebar)``,
   per unit logit step; a sum over the batch's response tokens, nats);
3. the ACTUAL change of the mean token entropy of the policy on held-out
   prompts (the run's eval split; responses sampled once from ``pi_t`` and
   fixed across methods) after one plain step ``theta - lr * g`` with the same
   ``lr = step_size / ||g_none||`` for both gradients (the none step has
   parameter-space length ``step_size``), weights restored after each; and
   the change of the mean token log-likelihood of the held-out correct
   responses;
4. the modulation's mean ``|A~| / |A|`` and the fraction of tokens with
   ``beta_stab < 0.95``.

95% Student-t intervals over replicates. Entry point for
``benchmarks/mechanisms.py``: :func:`run_m4`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import nemo_gdro / benchmarks from this checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.mech_m3 import (  # noqa: E402
    _cos,
    _fmt,
    _fmt_sci,
    _values,
    checkpoint_steps,
    choose_steps,
    draw_prompts,
    frozen_policies,
    generate,
    loss_gradient,
    part_main,
)

__all__ = ["M4Settings", "run_m4", "METHODS"]

METHODS = ("none", "dynamo")
#: Seed streams (offsets of the run seed): replicate batches, reference batches, held-out responses.
_BATCH_STREAM, _REFERENCE_STREAM, _HELDOUT_STREAM = 7_101, 7_102, 7_103


@dataclass(frozen=True)
class M4Settings:
    """What M4 measures; ``None`` sizes are the run's own (``trainer.prompts_per_step``, ``rollout.n``).

    alpha / lam_min: override the run's ``algorithm.dynamo.modulation`` values (``None``: the run's).
    step_size: parameter-space length of the plain step along the ``none`` gradient (both use its lr).
    """

    current_steps: tuple[int, ...] = (40, 20)
    replicates: int = 16
    prompts: int | None = None
    rollouts: int | None = None
    reference_rollouts: int = 64
    heldout_prompts: int = 64
    heldout_rollouts: int | None = None
    step_size: float = 1e-2
    alpha: float | None = None
    lam_min: float | None = None

    @classmethod
    def quick(cls, **changes: Any) -> M4Settings:
        """The toy version: the run's last step, 2 replicates of more rollouts than a toy step (see M3)."""
        base = dict(current_steps=(), replicates=2, prompts=16, rollouts=8, reference_rollouts=16,
                    heldout_prompts=16, heldout_rollouts=4)
        return cls(**{**base, **changes})


@dataclass
class Record:
    """One (t, replicate) measurement; per-method values keyed ``<metric>_<method>``."""

    t: int
    replicate: int
    lr: float
    reward_mean: float
    values: dict[str, float]
    modulation: dict[str, float]


# --------------------------------------------------------------------------- helpers
@contextmanager
def ebar_on(actor: Any) -> Iterator[None]:
    """Make the actor compute DynaMO's ``ebar`` in every pass (a run without the stage built it off)."""
    from nemo_gdro.parallel.vocab_parallel import make_token_stats_fn

    old = (actor.ebar, actor.token_stats_fn)
    if not actor.ebar:
        actor.ebar = True
        if not actor._custom_stats:
            actor.token_stats_fn = make_token_stats_fn(ebar=True)
    try:
        yield
    finally:
        actor.ebar, actor.token_stats_fn = old


@dataclass
class Heldout:
    """Fixed held-out responses of the current policy: tokens ``[R, S]``, lengths ``[R]``, mask ``[R, S-1]``,
    correct ``[R]``."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    correct: torch.Tensor


def heldout_responses(c: Any, num_prompts: int, n: int, seed: int, t: int) -> Heldout:
    """``n`` responses per prompt for the first ``num_prompts`` prompts of the run's (first) eval suite,
    sampled by the engine's current weights, scored by the suite's verifier."""
    from nemo_gdro.rollout.seeds import prompt_seeds

    if not c.task.eval_suites:
        raise ValueError("M4 needs the run's held-out eval split (task.eval_suites is empty)")
    suite = next(iter(c.task.eval_suites.values()))
    ids = torch.arange(min(num_prompts, len(suite.dataset)))
    records = suite.dataset.get_many(ids)
    batch = c.engine.generate(records, torch.full((len(records),), n, dtype=torch.int64),
                              prompt_seeds(seed + _HELDOUT_STREAM, t, ids))
    correct = suite.verifier.verify_batch(batch.responses, batch.answers).correct
    return Heldout(batch.tokens, batch.sequence_lengths, batch.response_mask.bool(), correct.bool())


@torch.no_grad()
def heldout_stats(c: Any, h: Heldout) -> dict[str, float]:
    """At the actor's weights: mean token entropy over the held-out responses and mean token log-likelihood
    of the correct ones (NaN without a correct response), nats."""
    stats = c.actor.compute_token_stats(h.tokens, lengths=h.lengths)
    m = h.mask
    ent = float((stats["entropy"] * m).sum() / m.sum().clamp_min(1))
    mc = m & h.correct[:, None]
    ll = float((stats["logp"] * mc).sum() / mc.sum()) if bool(mc.any()) else math.nan
    return {"entropy": ent, "loglik_correct": ll}


@contextmanager
def stepped(actor: Any, flat_grad: torch.Tensor, lr: float) -> Iterator[None]:
    """The actor's weights moved to ``theta - lr * g`` (``g`` flattened in ``named_parameters`` order, as
    :func:`benchmarks.mech_m3.loss_gradient` returns it), restored on exit."""
    params = [p for _, p in actor.module.named_parameters()]
    total = sum(p.numel() for p in params)
    if total != flat_grad.numel():
        raise ValueError(f"gradient has {flat_grad.numel()} entries, the actor {total}")
    saved = [p.detach().clone() for p in params]
    try:
        offset = 0
        with torch.no_grad():
            for p in params:
                chunk = flat_grad[offset: offset + p.numel()].view(p.shape).to(device=p.device, dtype=p.dtype)
                p.add_(chunk, alpha=-lr)
                offset += p.numel()
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


# --------------------------------------------------------------------------- measurement
def modulation_config(c: Any, settings: M4Settings) -> Any:
    """The run's ``algorithm.dynamo.modulation`` with the settings' overrides."""
    cfg = c.cfg.algorithm.dynamo_modulation
    changes = {k: v for k, v in (("alpha", settings.alpha), ("lam_min", settings.lam_min)) if v is not None}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def measure(policies: Any, t: int, settings: M4Settings, seed: int, log=print) -> list[Record]:
    """Every replicate's record at step ``t``."""
    from nemo_gdro.algorithms.dynamo_modulation import entropy_change, modulate_advantages
    from nemo_gdro.rollout.seeds import prompt_seeds
    from nemo_gdro.stages.base import MinibatchView
    from nemo_gdro.stages.modulation import DynamoModulation

    c = policies.c
    cfg = c.cfg
    P = settings.prompts or cfg.trainer.prompts_per_step
    n = settings.rollouts or cfg.rollout.n
    pool = len(c.task.train)
    base = cfg.seed if seed is None else seed
    mod_cfg = modulation_config(c, settings)
    stage = DynamoModulation(mod_cfg, c.dp)

    policies.use(t)
    heldout = heldout_responses(c, settings.heldout_prompts, settings.heldout_rollouts or n, base, t)
    before = heldout_stats(c, heldout)
    records: list[Record] = []
    for j in range(settings.replicates):
        ids = draw_prompts(pool, P, base, j)
        ref = generate(policies, ids, settings.reference_rollouts, prompt_seeds(base + _REFERENCE_STREAM, j, ids))
        g_on = loss_gradient(c, ref, "clipped", on_policy=True)
        batch = generate(policies, ids, n, prompt_seeds(base + _BATCH_STREAM, j, ids))
        # The trainer's path (step.py): the current policy's no-grad stats -> MinibatchView -> prepare.
        current = c.actor.compute_token_stats(batch.tokens, lengths=batch.lengths)
        view = MinibatchView(advantages=batch.advantages, behaviour_logp=batch.behaviour_logp, mask=batch.mask,
                             current=current)
        context = stage.prepare(view)
        grads = {
            "none": loss_gradient(c, batch, "clipped"),
            "dynamo": loss_gradient(c, batch, "clipped", modulation=stage, modulation_context=context),
        }
        a_tilde, mod = modulate_advantages(
            batch.advantages, current["logp"], batch.behaviour_logp, current["entropy"], batch.mask, mod_cfg,
            ebar_exact=current.get("ebar"), stats=context,
        )
        advs = {"none": batch.advantages, "dynamo": a_tilde}
        lr = settings.step_size / max(float(grads["none"].norm()), 1e-30)
        values: dict[str, float] = {"cos_none_dynamo": _cos(grads["none"], grads["dynamo"])}
        for name, g in grads.items():
            dh = entropy_change(
                advs[name], current["logp"], batch.behaviour_logp, current["entropy"], batch.mask,
                eps_low=mod_cfg.eps_low, eps_high=mod_cfg.eps_high, ebar_exact=current.get("ebar"),
                ebar_mode=mod_cfg.ebar,
            )
            with stepped(c.actor, g, lr):
                after = heldout_stats(c, heldout)
            values.update({
                f"cos_{name}": _cos(g, g_on),
                f"norm_{name}": float(g.norm()),
                f"dH_pred_{name}": float(dh.sum()),
                f"abs_dH_pred_{name}": abs(float(dh.sum())),
                f"sum_abs_dH_{name}": float(dh.abs().sum()),
                f"dH_heldout_{name}": after["entropy"] - before["entropy"],
                f"abs_dH_heldout_{name}": abs(after["entropy"] - before["entropy"]),
                f"dloglik_correct_{name}": after["loglik_correct"] - before["loglik_correct"],
            })
        modulation = {
            "adv_ratio_mean": float(mod["adv_ratio_mean"]),
            "frac_beta_stab_below_0.95": float(mod["frac_beta_stab_below_0.95"]),
            "beta_comp_mean": float(mod["beta_comp/mean"]),
            "beta_stab_mean": float(mod["beta_stab/mean"]),
        }
        records.append(Record(t=t, replicate=j, lr=lr, reward_mean=batch.reward_mean, values=values,
                              modulation=modulation))
        log(f"[m4] t={t} rep {j}: cos none {values['cos_none']:.3f} dynamo {values['cos_dynamo']:.3f}; "
            f"pred dH {values['dH_pred_none']:.3e} / {values['dH_pred_dynamo']:.3e}; held-out dH "
            f"{values['dH_heldout_none']:.3e} / {values['dH_heldout_dynamo']:.3e}; |A~|/|A| "
            f"{modulation['adv_ratio_mean']:.3f} braked {modulation['frac_beta_stab_below_0.95']:.4f}")
    return records


# --------------------------------------------------------------------------- summary
#: Per-method metrics (value of each method and the paired dynamo - none difference).
PAIRED = ("cos", "norm", "dH_pred", "abs_dH_pred", "sum_abs_dH", "dH_heldout", "abs_dH_heldout", "dloglik_correct")
LABELS = {
    "cos": "cosine to on-policy reference gradient",
    "norm": "gradient norm",
    "dH_pred": "predicted entropy change sum_t dH_t (per unit logit step)",
    "abs_dH_pred": "abs(sum_t dH_t)",
    "sum_abs_dH": "sum_t abs(dH_t)",
    "dH_heldout": "actual held-out entropy change after the step (nats/token)",
    "abs_dH_heldout": "abs(actual held-out entropy change)",
    "dloglik_correct": "held-out log-lik. change of correct responses (nats/token)",
}


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    """Per t: each metric's mean and 95% interval per method and paired (dynamo - none); the modulation's
    statistics; the cosine between the two gradients; the step's lr."""
    from benchmarks.efficacy_report import mean_ci

    def ci(values: Any) -> dict[str, float]:
        return mean_ci([float(v) for v in values]).as_dict()

    out: dict[str, Any] = {}
    for t in sorted({r.t for r in records}, reverse=True):
        here = sorted((r for r in records if r.t == t), key=lambda r: r.replicate)
        metrics = {}
        for m in PAIRED:
            metrics[m] = {name: ci(r.values[f"{m}_{name}"] for r in here) for name in METHODS}
            metrics[m]["dynamo_minus_none"] = ci(r.values[f"{m}_dynamo"] - r.values[f"{m}_none"] for r in here)
        out[str(t)] = {
            "metrics": metrics,
            "cos_none_dynamo": ci(r.values["cos_none_dynamo"] for r in here),
            "modulation": {k: ci(r.modulation[k] for r in here) for k in here[0].modulation},
            "lr": ci(r.lr for r in here),
            "reward_mean": ci(r.reward_mean for r in here),
        }
    return out


def markdown(summary: dict[str, Any], settings: M4Settings, meta: dict[str, Any]) -> str:
    """One table per t: each metric for none, dynamo and their paired difference; the modulation's statistics."""
    lines = [
        "## M4: DynaMO's token modulation at a frozen policy",
        "",
        f"Run `{meta['run_dir']}`; per replicate an on-policy batch of {meta['prompts']} prompts x {meta['rollouts']} "
        f"rollouts from pi_t; the clipped loss with token_modulation=none vs dynamo (alpha {meta['alpha']:g}, "
        f"lam_min {meta['lam_min']:g}, gamma {meta['gamma']:g}, tau {meta['tau']:g}, ebar {meta['ebar']}, scope "
        f"{meta['scope']}). Reference: the on-policy GRPO gradient from {settings.reference_rollouts} rollouts per "
        f"prompt. Held-out: {meta['heldout_responses']} responses of pi_t to the first {settings.heldout_prompts} "
        f"eval prompts (fixed across methods); one plain step theta - lr g with lr = {settings.step_size:g} / ||g_none|| "
        "for both methods (the dynamo step's length is ||g_dynamo|| / ||g_none|| times the none step's), weights "
        f"restored after each. {settings.replicates} replicate(s), common random numbers; 95% Student-t intervals.",
        "",
    ]
    for t, entry in summary.items():
        lines += [f"### t = {t}", "", "| metric | none | dynamo | dynamo - none (paired) |", "|---|---|---|---|"]
        for m in PAIRED:
            e = entry["metrics"][m]
            f = _fmt if m in ("cos",) else _fmt_sci
            lines.append(f"| {LABELS[m]} | {f(e['none'])} | {f(e['dynamo'])} | {f(e['dynamo_minus_none'])} |")
        mod = entry["modulation"]
        lines += [
            f"| cosine(g_none, g_dynamo) | | {_fmt(entry['cos_none_dynamo'], 4)} | |",
            f"| mean abs(A~)/abs(A) | | {_fmt(mod['adv_ratio_mean'], 4)} | |",
            f"| fraction of tokens with beta_stab < 0.95 | | {_fmt_sci(mod['frac_beta_stab_below_0.95'])} | |",
            f"| mean beta_comp / beta_stab | | {_fmt(mod['beta_comp_mean'], 4)} / {_fmt(mod['beta_stab_mean'], 4)} | |",
            f"| step lr | {_fmt_sci(entry['lr'])} | | |",
            "",
        ]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Per t, none vs dynamo (top row) and the paired difference dynamo - none (bottom row): cosine to the
    reference, |predicted sum dH| on the batch, actual held-out entropy change; 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("cos", "cosine to on-policy gradient"), ("abs_dH_pred", "|predicted sum_t dH_t| (batch)"),
              ("dH_heldout", "actual held-out entropy change"))
    ts = list(summary)
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6.6), squeeze=False)
    width = 0.38

    def bars(ax: Any, x: list[float], entries: list[dict[str, float]], label: str) -> None:
        means, los, his = zip(*(_values(e) for e in entries))
        err = [[max(a - b, 0) if math.isfinite(b) else 0 for a, b in zip(means, los)],
               [max(b - a, 0) if math.isfinite(b) else 0 for a, b in zip(means, his)]]
        ax.bar(x, means, width, yerr=err, capsize=3, label=label)

    for col, (m, title) in enumerate(panels):
        ax = axes[0][col]
        for i, name in enumerate(METHODS):
            bars(ax, [k + (i - 0.5) * width for k in range(len(ts))],
                 [summary[t]["metrics"][m][name] for t in ts], name)
        ax.set_title(title, fontsize=9)
        diff = axes[1][col]
        bars(diff, list(range(len(ts))), [summary[t]["metrics"][m]["dynamo_minus_none"] for t in ts],
             "dynamo - none (paired)")
        diff.set_title(f"{title}: dynamo - none", fontsize=9)
        for a in (ax, diff):
            a.set_xticks(range(len(ts)), [f"t = {t}" for t in ts])
            a.axhline(0, color="gray", linewidth=0.8)
            a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry point
def run_m4(run_dir: Path, out_dir: Path, quick: bool, seed: int, settings: M4Settings | None = None,
           log=print) -> dict[str, Any]:
    """M4 on ``run_dir``; writes ``mechanisms_m4.png`` under ``out_dir``.

    Returns ``{"markdown": the tables, "json": every figure, "plots": [png paths]}``.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    settings = settings or (M4Settings.quick() if quick else M4Settings())
    t0 = time.perf_counter()
    steps = choose_steps(checkpoint_steps(run_dir), settings.current_steps, (0,))
    log(f"[m4] current steps {steps}, {settings.replicates} replicate(s)")
    records: list[Record] = []
    with frozen_policies(run_dir, steps[0]) as policies:
        c = policies.c
        cfg = c.cfg
        mod_cfg = modulation_config(c, settings)
        with ebar_on(c.actor):
            for t in steps:
                records += measure(policies, t, settings, seed, log)
    summary = summarize(records)
    n = settings.rollouts or cfg.rollout.n
    meta = {
        "run_dir": str(run_dir),
        "current_steps": steps,
        "prompts": settings.prompts or cfg.trainer.prompts_per_step,
        "rollouts": n,
        "heldout_responses": settings.heldout_prompts * (settings.heldout_rollouts or n),
        **{k: getattr(mod_cfg, k) for k in ("alpha", "lam_min", "gamma", "tau", "ebar", "scope", "eps_low", "eps_high")},
        "policy_loss": asdict(cfg.algorithm.policy_loss),
        "settings": asdict(settings),
        "seed": seed,
        "quick": quick,
        "wall_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
    }
    md = markdown(summary, settings, meta)
    png = plot(summary, out_dir / "mechanisms_m4.png")
    data = {"meta": meta, "summary": summary, "records": [asdict(r) for r in records]}
    return {"markdown": md, "json": data, "plots": [str(png)]}


def _rebuild(data: dict[str, Any], saved: M4Settings, out: Path) -> None:
    (out / "mechanisms_m4.md").write_text(markdown(data["summary"], saved, data["meta"]) + "\n")
    plot(data["summary"], out / "mechanisms_m4.png")


def main(argv: Sequence[str] | None = None) -> int:
    return part_main(
        "m4", argv, M4Settings, run_m4, _rebuild, doc=__doc__ or "",
        quick_help="the toy version (last step, 2 replicates)",
        run_help="run directory with checkpoints (with --quick and no --run: a toy run)",
    )


if __name__ == "__main__":
    sys.exit(main())
