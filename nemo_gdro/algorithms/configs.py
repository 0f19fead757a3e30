"""The frozen configs of the algorithm modules (field names and defaults are the spec's).

They live in one torch-free module so that ``nemo-gdro train`` can type-check a
whole run config, and answer a bad value in about a second, before it imports
torch or Megatron. Each algorithm module re-exports its config; import it from
there (``from nemo_gdro.algorithms.losses import R2VPOConfig``) or from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from nemo_gdro.algorithms._scalar_checks import is_finite_real, is_int, is_real

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------
# advantages.py
StdKind = Literal["unbiased", "population"]


@dataclass(frozen=True)
class AdvantageConfig:
    """GRPO advantage options (grpo_base.md §3).

    normalize_by_std: divide by the group std (False: Dr.GRPO mean-centring).
    std: ``unbiased`` (as ``torch.std``, default) or ``population``.
    eps: added to the std in the denominator.
    adv_clip: advantages are clipped to ``[-adv_clip, adv_clip]``; ``None`` disables.
    """

    normalize_by_std: bool = True
    std: StdKind = "unbiased"
    eps: float = 1e-6
    adv_clip: float | None = 5.0

    def __post_init__(self) -> None:
        if self.std not in ("unbiased", "population"):
            raise ValueError(f"advantage.std must be 'unbiased' or 'population', got {self.std!r}")
        if self.eps < 0:
            raise ValueError(f"advantage.eps must be >= 0, got {self.eps}")
        if self.adv_clip is not None and self.adv_clip <= 0:
            raise ValueError(f"advantage.adv_clip must be > 0 or null, got {self.adv_clip}")


# ----------------------------------------------------------------------
# stats.py
Indicator = Literal["any_correct", "mean_correct"]
MAX_WINDOW = 64


@dataclass(frozen=True)
class StatsConfig:
    """Options of the per-prompt store.

    window: H, the number of most recent indicators kept (1..64, default 50).
    indicator: ``any_correct`` (1 if any rollout of the step is correct) or
        ``mean_correct`` (fraction of correct rollouts).
    counter_decay: ``None`` keeps G and K cumulative (ref-code); a value in
        (0, 1) multiplies both by it before each observation of the prompt.
    """

    window: int = 50
    indicator: Indicator = "any_correct"
    counter_decay: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.window <= MAX_WINDOW:
            raise ValueError(f"stats.window must be in [1, {MAX_WINDOW}], got {self.window}")
        if self.indicator not in ("any_correct", "mean_correct"):
            raise ValueError(
                f"stats.indicator must be 'any_correct' or 'mean_correct', got {self.indicator!r}"
            )
        if self.counter_decay is not None and not 0.0 < self.counter_decay < 1.0:
            raise ValueError(f"stats.counter_decay must be in (0, 1) or null, got {self.counter_decay}")


# ----------------------------------------------------------------------
# difficulty.py
DEFAULT_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class DifficultyConfig:
    """Classifier options.

    edges: increasing bin edges in (0, 1); ``B = len(edges) + 1`` bins, bin 0
        holds the lowest pass rate (hardest).
    hysteresis: a prompt leaves its previous bin only when its estimate lies
        outside that bin's interval by more than this.
    unseen_bin: bin of never-observed prompts: an integer in ``[0, B)``
        (default 0, as in the paper) or ``"separate"`` for an extra bin ``B``.
    correct_threshold: a rollout counts as correct when its reward is above it.
    """

    edges: tuple[float, ...] = field(default=DEFAULT_EDGES)
    hysteresis: float = 0.03
    unseen_bin: int | Literal["separate"] = 0
    correct_threshold: float = 0.5

    def __post_init__(self) -> None:
        edges = tuple(float(e) for e in self.edges)
        object.__setattr__(self, "edges", edges)
        if not edges:
            raise ValueError("difficulty.edges must hold at least one edge")
        if any(not 0.0 < e < 1.0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"difficulty.edges must be strictly increasing values in (0, 1), got {list(edges)}")
        if self.hysteresis < 0:
            raise ValueError(f"difficulty.hysteresis must be >= 0, got {self.hysteresis}")
        if self.unseen_bin != "separate" and not (
            isinstance(self.unseen_bin, int) and 0 <= self.unseen_bin <= len(edges)
        ):
            raise ValueError(
                f"difficulty.unseen_bin must be 'separate' or an integer in [0, {len(edges)}], got {self.unseen_bin!r}"
            )

    @property
    def num_pass_rate_bins(self) -> int:
        return len(self.edges) + 1

    @property
    def num_bins(self) -> int:
        """Bins the controllers see: ``B``, plus one when unseen prompts get their own."""
        return self.num_pass_rate_bins + (1 if self.unseen_bin == "separate" else 0)

    @property
    def unseen_bin_index(self) -> int:
        return self.num_pass_rate_bins if self.unseen_bin == "separate" else int(self.unseen_bin)


# ----------------------------------------------------------------------
# zero_variance_skip.py
#: Longest zero-variance streak the table counts (int16); longer streaks saturate.
MAX_SKIP_STREAK = 32767


@dataclass(frozen=True)
class PromptSkipConfig:
    """``prompt_skip``: GRESO-style skipping of prompts predicted zero-variance (arXiv 2506.02177).

    A prompt whose last ``z >= min_streak`` visits all gave zero-variance groups
    (every reward of its group equal) is a skip candidate; it is kept anyway
    (explored) with probability ``p_e ** (z - min_streak + 1)`` and skipped
    otherwise, so a longer streak is skipped more surely (the paper's skip
    probability ``1 - p_e ** z`` at ``min_streak = 1``).

    min_streak: zero-variance visits in a row that make a prompt a candidate
        (>= 1; 1 as in the paper: one zero-variance epoch predicts the next).
    explore: ``p_e`` in [0, 1]; with ``adapt`` the starting value of both the
        easy and the hard ``p_e`` (0.5, the authors' release).
    adapt: move ``p_e`` by ``adapt_step`` after every step from the second
        epoch on, separately for easy (all rewards high) and hard (all low)
        groups, towards ``target_zero_variance`` zero-variance groups among the
        drawn prompts (1/3 of it easy, 2/3 hard, as the release): above the
        target ``p_e`` falls (skip more), below it rises.
    target_zero_variance: the target share of zero-variance groups per step.
    adapt_step: the change of ``p_e`` per step.
    explore_min, explore_max: bounds of the adapted ``p_e``.
    """

    min_streak: int = 1
    explore: float = 0.5
    adapt: bool = True
    target_zero_variance: float = 0.25
    adapt_step: float = 0.01
    explore_min: float = 0.05
    explore_max: float = 0.95

    def __post_init__(self) -> None:
        p = "prompt_skip"
        if not (is_int(self.min_streak) and 1 <= self.min_streak <= MAX_SKIP_STREAK):
            raise ValueError(f"{p}.min_streak must be an integer in [1, {MAX_SKIP_STREAK}], got {self.min_streak!r}")
        for key in ("explore", "target_zero_variance", "explore_min", "explore_max"):
            value = getattr(self, key)
            if not (is_finite_real(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{p}.{key} must be in [0, 1], got {value!r}")
        if not isinstance(self.adapt, bool):
            raise ValueError(f"{p}.adapt must be true or false, got {self.adapt!r}")
        if not (is_finite_real(self.adapt_step) and 0.0 <= self.adapt_step <= 1.0):
            raise ValueError(f"{p}.adapt_step must be in [0, 1], got {self.adapt_step!r}")
        if self.explore_min > self.explore_max:
            raise ValueError(f"{p}.explore_min must be <= {p}.explore_max, got {self.explore_min} > {self.explore_max}")
        if self.adapt and not self.explore_min <= self.explore <= self.explore_max:
            raise ValueError(
                f"{p}.explore must lie in [explore_min, explore_max] = [{self.explore_min}, {self.explore_max}] "
                f"when {p}.adapt is true, got {self.explore}"
            )


# ----------------------------------------------------------------------
# prompt_gdro.py
WeightForm = Literal["normalized", "paper"]
Signal = Literal["surrogate", "failure", "learnability"]
NormalizeOver = Literal["all", "informative"]
ResampleBase = Literal["data", "bins"]


@dataclass(frozen=True)
class PromptGDROConfig:
    """Prompt-GDRO options; defaults are the paper's (gdro.md §2).

    beta: EMA rate of the bin scores. eta: exponential-weights temperature.
    gamma: uniform mixing of ``q``. score_clip: ``C`` (``None``: no clip).
    share_floor: floor of a bin's batch share in the frequency debias.
    weight_form: ``normalized`` (``q_b`` rescaled to mean 1 over the batch's
        responses, capped at ``w_max``) | ``paper`` (``min(omega_b, w_max)``).
    normalize_over: responses the ``normalized`` weights are rescaled over to
        mean 1: ``all`` (ref-code) | ``informative`` (non-zero GRPO advantage
        only, so an upweighted bin of all-fail groups does not shrink the rest).
    signal: ``surrogate`` | ``failure`` | ``learnability``.
    signal_include_kl: add ``kl_coef * KL`` to the surrogate signal.
    resample_base: neutral point of ``prompt_gdro_resample``: ``data`` (a bin is
        drawn with ``p_b`` proportional to pool share x omega, mixed with
        ``gamma`` x pool share; prompts without replacement within a step, so a
        flat adversary is uniform sampling over the pool) | ``bins`` (the first
        form: a bin drawn from ``q``, uniform over bins, with replacement).
    importance_correct: when resampling, scale advantages back to the data
        distribution: ``data``: ``pool_share_b / p_b`` capped at ``w_max`` and
        rescaled to mean 1 over the batch's responses (gdro.md §2); ``bins``:
        ``pool_share_b / q_b`` capped at ``importance_cap`` (the first form).
    importance_cap: cap of the ``bins`` form's importance factor.
    reward_range: ``(r_min, r_max)`` used to rescale rewards for ``failure``.
    """

    beta: float = 0.12
    eta: float = 0.65
    gamma: float = 0.01
    score_clip: float | None = None
    share_floor: float = 1e-3
    weight_form: WeightForm = "normalized"
    w_max: float = 15.0
    normalize_over: NormalizeOver = "all"
    signal: Signal = "surrogate"
    signal_include_kl: bool = False
    resample_base: ResampleBase = "data"
    importance_correct: bool = False
    importance_cap: float = 15.0
    reward_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reward_range", tuple(float(r) for r in self.reward_range))
        checks = [
            (0.0 < self.beta <= 1.0, f"prompt_gdro.beta must be in (0, 1], got {self.beta}"),
            (self.eta >= 0.0, f"prompt_gdro.eta must be >= 0, got {self.eta}"),
            (0.0 <= self.gamma <= 1.0, f"prompt_gdro.gamma must be in [0, 1], got {self.gamma}"),
            (self.score_clip is None or self.score_clip > 0, f"prompt_gdro.score_clip must be > 0 or null, got {self.score_clip}"),
            (0.0 < self.share_floor <= 1.0, f"prompt_gdro.share_floor must be in (0, 1], got {self.share_floor}"),
            (self.weight_form in ("normalized", "paper"), f"prompt_gdro.weight_form must be 'normalized' or 'paper', got {self.weight_form!r}"),
            (self.w_max > 0, f"prompt_gdro.w_max must be > 0, got {self.w_max}"),
            (self.normalize_over in ("all", "informative"), f"prompt_gdro.normalize_over must be 'all' or 'informative', got {self.normalize_over!r}"),
            (self.resample_base in ("data", "bins"), f"prompt_gdro.resample_base must be 'data' or 'bins', got {self.resample_base!r}"),
            (self.signal in ("surrogate", "failure", "learnability"), f"prompt_gdro.signal must be 'surrogate', 'failure' or 'learnability', got {self.signal!r}"),
            (self.importance_cap > 0, f"prompt_gdro.importance_cap must be > 0, got {self.importance_cap}"),
            (len(self.reward_range) == 2 and self.reward_range[0] < self.reward_range[1], f"prompt_gdro.reward_range must be [r_min, r_max] with r_min < r_max, got {list(self.reward_range)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ----------------------------------------------------------------------
# rollout_gdro.py
MODES = ("sqrt", "bandit")
PROXIES = ("bernoulli", "loss_var")
SIGNS = ("utility", "adversarial")
Mode = Literal["sqrt", "bandit"]
Proxy = Literal["bernoulli", "loss_var"]
Sign = Literal["utility", "adversarial"]


@dataclass(frozen=True)
class RolloutGDROConfig:
    """``rollout_gdro`` config (gdro.md §3). Field names and defaults are the spec's.

    mode: ``sqrt`` (square-root law) or ``bandit`` (exponential-weights arms + DP).
    n_min, n_max: bounds on rollouts per prompt (integers, ``1 <= n_min <= n_max``).
    n_bar: mean budget of rollouts per prompt; an integer in ``[n_min, n_max]`` so
        that the uniform plan is feasible, which makes ``P * n_bar`` feasible for
        every batch.
    proxy: per-bin variance proxy ``v_b``: ``bernoulli`` (mean ``p(1-p)`` of the
        bin's prompts from the cumulative success counters) or ``loss_var``
        (EMA of the variance of per-prompt mean loss signals within the bin).
    v_floor: lower bound on ``v_b`` (> 0), so no bin's weight is zero.
    unseen_success: success rate ``p`` assumed for a prompt never observed.
    loss_var_beta: EMA step of the ``loss_var`` proxy, in ``(0, 1]``.
    eta: inverse temperature of the arm softmax (>= 0).
    gamma: uniform exploration mass mixed into each bin's arm distribution.
    score_decay: EMA step of the chosen arm's score, in ``(0, 1]``.
    sign: ``utility`` (paper: ``J_b = -mean signal``) or ``adversarial``
        (ref-code: ``J_b = +mean signal``).
    alpha_mu: step size of the shadow price update (>= 0).
    mu_max: upper clip of the shadow price (> 0).
    mu_init: initial shadow price, in ``[0, mu_max]``.
    """

    mode: Mode = "sqrt"
    n_min: int = 2
    n_max: int = 12
    n_bar: int = 4
    proxy: Proxy = "bernoulli"
    v_floor: float = 1e-3
    unseen_success: float = 0.5
    loss_var_beta: float = 0.12
    eta: float = 0.65
    gamma: float = 0.01
    score_decay: float = 0.4
    sign: Sign = "utility"
    alpha_mu: float = 0.05
    mu_max: float = 10.0
    mu_init: float = 0.0

    def __post_init__(self) -> None:
        p = "rollout_gdro"
        if self.mode not in MODES:
            raise ValueError(f"{p}.mode must be one of {MODES}, got {self.mode!r}")
        if not (is_int(self.n_min) and self.n_min >= 1):
            raise ValueError(f"{p}.n_min must be an integer >= 1, got {self.n_min!r}")
        if not (is_int(self.n_max) and self.n_max >= self.n_min):
            raise ValueError(f"{p}.n_max must be an integer >= n_min={self.n_min}, got {self.n_max!r}")
        if not (is_int(self.n_bar) and self.n_min <= self.n_bar <= self.n_max):
            raise ValueError(
                f"{p}.n_bar must be an integer in [n_min={self.n_min}, n_max={self.n_max}] "
                f"(so that the uniform plan is feasible), got {self.n_bar!r}"
            )
        if self.proxy not in PROXIES:
            raise ValueError(f"{p}.proxy must be one of {PROXIES}, got {self.proxy!r}")
        if not (is_finite_real(self.v_floor) and self.v_floor > 0):
            raise ValueError(f"{p}.v_floor must be a finite number > 0, got {self.v_floor!r}")
        if not (is_finite_real(self.unseen_success) and 0.0 <= self.unseen_success <= 1.0):
            raise ValueError(f"{p}.unseen_success must be in [0, 1], got {self.unseen_success!r}")
        if not (is_finite_real(self.loss_var_beta) and 0.0 < self.loss_var_beta <= 1.0):
            raise ValueError(f"{p}.loss_var_beta must be in (0, 1], got {self.loss_var_beta!r}")
        if not (is_finite_real(self.eta) and self.eta >= 0):
            raise ValueError(f"{p}.eta must be a finite number >= 0, got {self.eta!r}")
        if not (is_finite_real(self.gamma) and 0.0 <= self.gamma <= 1.0):
            raise ValueError(f"{p}.gamma must be in [0, 1], got {self.gamma!r}")
        if not (is_finite_real(self.score_decay) and 0.0 < self.score_decay <= 1.0):
            raise ValueError(f"{p}.score_decay must be in (0, 1], got {self.score_decay!r}")
        if self.sign not in SIGNS:
            raise ValueError(f"{p}.sign must be one of {SIGNS}, got {self.sign!r}")
        if not (is_finite_real(self.alpha_mu) and self.alpha_mu >= 0):
            raise ValueError(f"{p}.alpha_mu must be a finite number >= 0, got {self.alpha_mu!r}")
        if not (is_finite_real(self.mu_max) and self.mu_max > 0):
            raise ValueError(f"{p}.mu_max must be a finite number > 0, got {self.mu_max!r}")
        if not (is_finite_real(self.mu_init) and 0.0 <= self.mu_init <= self.mu_max):
            raise ValueError(f"{p}.mu_init must be in [0, mu_max={self.mu_max}], got {self.mu_init!r}")

    @property
    def num_arms(self) -> int:
        """``K = n_max - n_min + 1``."""
        return self.n_max - self.n_min + 1

    @property
    def arms(self) -> torch.Tensor:
        """Arm values ``n_min..n_max``, int64 ``[K]``."""
        import torch  # only the controller asks for this; validating a config must not import torch

        return torch.arange(self.n_min, self.n_max + 1, dtype=torch.int64)


# ----------------------------------------------------------------------
# dynamo_allocation.py
Refresh = Literal["every_step", "every_epoch"]


@dataclass(frozen=True)
class DynamoAllocationConfig:
    """``dynamo`` allocation options (dynamo.md §1).

    n_bar: mean rollouts per prompt; the step's budget is ``T = n_bar * P``.
    n_min, n_max: per-prompt bounds. ``n_min <= n_bar <= n_max`` is required so
        that clipping ``T`` to ``[P n_min, P n_max]`` never changes it (the
        spec rejects such a config instead of silently shrinking the budget).
    warmup: a prompt with fewer than ``warmup`` cumulative rollouts is in
        warm-up and first gets ``warmup - G`` rollouts (at most ``n_max`` per
        step: a larger demand is finished on the prompt's next draws);
        ``None`` means ``max(n_min, 4)`` (see :attr:`effective_warmup`).
    mastery: success rate at or above which a prompt gets the floor priority.
    floor: minimum priority (> 0): never-solved and mastered prompts keep it.
    power: weights are ``priority ** power``; 1.0 = ref-code (n grows with the
        variance), 0.5 = Neyman (n grows with the standard deviation).
    refresh: ``every_step`` reads the live counters; ``every_epoch`` reads a
        snapshot taken by :meth:`DynamoAllocator.refresh_epoch`.
    warmup_compete: ``False`` (default): a prompt in warm-up takes
        ``max(n_min, warmup - G)`` and stays out of the water-fill. ``True``
        (the authors' release): it gets ``n_min`` like every prompt and competes
        in the water-fill at priority 1.0 when unseen (``G == 0``) or at its
        running priority, so unseen prompts tend to reach ``n_max``
        (dynamo.md §1, Allocation step 3).
    """

    n_bar: int = 16
    n_min: int = 8
    n_max: int = 24
    warmup: int | None = None
    mastery: float = 0.85
    floor: float = 0.01
    power: float = 1.0
    refresh: Refresh = "every_step"
    warmup_compete: bool = False

    def __post_init__(self) -> None:
        for key in ("n_bar", "n_min", "n_max"):
            value = getattr(self, key)
            if not is_int(value):
                raise ValueError(f"dynamo.{key} must be an integer, got {value!r}")
        if self.n_min < 1:
            raise ValueError(f"dynamo.n_min must be >= 1, got {self.n_min}")
        if self.n_max < self.n_min:
            raise ValueError(f"dynamo.n_max must be >= n_min ({self.n_min}), got {self.n_max}")
        if not self.n_min <= self.n_bar <= self.n_max:
            # T = n_bar * P clipped to [P n_min, P n_max] would differ from
            # n_bar * P: the run would not spend the compute it was configured for.
            raise ValueError(
                f"dynamo.n_bar must lie in [n_min, n_max] = [{self.n_min}, {self.n_max}] so the "
                f"budget n_bar * P is feasible as configured, got {self.n_bar}"
            )
        if self.warmup is not None:
            if not is_int(self.warmup) or self.warmup < 1:
                raise ValueError(f"dynamo.warmup must be a positive integer or null, got {self.warmup!r}")
        if not is_finite_real(self.mastery) or not 0.0 < self.mastery <= 1.0:
            raise ValueError(f"dynamo.mastery must be in (0, 1], got {self.mastery!r}")
        if not is_finite_real(self.floor) or self.floor <= 0.0:
            raise ValueError(f"dynamo.floor must be a finite number > 0, got {self.floor!r}")
        if not is_finite_real(self.power) or self.power <= 0.0:
            raise ValueError(f"dynamo.power must be a finite number > 0, got {self.power!r}")
        if self.refresh not in ("every_step", "every_epoch"):
            raise ValueError(f"dynamo.refresh must be 'every_step' or 'every_epoch', got {self.refresh!r}")
        if not isinstance(self.warmup_compete, bool):
            raise ValueError(f"dynamo.warmup_compete must be true or false, got {self.warmup_compete!r}")

    @property
    def effective_warmup(self) -> int:
        """Warm-up threshold in rollouts: ``warmup`` or ``max(n_min, 4)``."""
        return self.warmup if self.warmup is not None else max(self.n_min, 4)


# ----------------------------------------------------------------------
# dynamo_modulation.py
EbarMode = Literal["exact", "sequence_mean"]
Scope = Literal["minibatch", "microbatch"]


@dataclass(frozen=True)
class DynamoModulationConfig:
    """``dynamo`` token-level options (dynamo.md §2).

    alpha: compensation strength (``beta_comp`` in ``[1, 1 + alpha]``).
    lam_min: floor of the stabilisation factor (``beta_stab`` in ``(lam_min, 1]``).
    gamma, tau: steepness and centre of the brake's sigmoid in ``x = |dH| / max|dH|``.
    eps_low, eps_high: the clip range of the policy loss; a token outside it
        gets no gradient and so no entropy change.
    ebar: ``exact`` (``sum_a pi_a^2 (log pi_a + H)`` from the vocabulary pass)
        or ``sequence_mean`` (per-sequence mean of ``u``, ref-code option).
    scope: ``minibatch`` (H_min, H_max, max|dH| over the optimizer mini-batch
        across DP ranks: pass merged/reduced :class:`ModulationStats`) or
        ``microbatch`` (ref-code: statistics of each call's tokens).
    """

    alpha: float = 0.2
    lam_min: float = 0.6
    gamma: float = 50.0
    tau: float = 0.99
    eps_low: float = 0.2
    eps_high: float = 0.28
    ebar: EbarMode = "exact"
    scope: Scope = "minibatch"

    def __post_init__(self) -> None:
        if not is_finite_real(self.alpha) or self.alpha < 0.0:
            raise ValueError(f"dynamo.alpha must be a finite number >= 0, got {self.alpha!r}")
        if not is_finite_real(self.lam_min) or not 0.0 <= self.lam_min <= 1.0:
            raise ValueError(f"dynamo.lam_min must be in [0, 1], got {self.lam_min!r}")
        if not is_finite_real(self.gamma) or self.gamma <= 0.0:
            raise ValueError(f"dynamo.gamma must be a finite number > 0, got {self.gamma!r}")
        if not is_finite_real(self.tau) or self.tau <= 0.0:
            raise ValueError(f"dynamo.tau must be a finite number > 0, got {self.tau!r}")
        if not is_finite_real(self.eps_low) or not 0.0 < self.eps_low < 1.0:
            raise ValueError(f"dynamo.eps_low must be in (0, 1), got {self.eps_low!r}")
        if not is_finite_real(self.eps_high) or self.eps_high <= 0.0:
            raise ValueError(f"dynamo.eps_high must be a finite number > 0, got {self.eps_high!r}")
        if self.ebar not in ("exact", "sequence_mean"):
            raise ValueError(f"dynamo.ebar must be 'exact' or 'sequence_mean', got {self.ebar!r}")
        if self.scope not in ("minibatch", "microbatch"):
            raise ValueError(f"dynamo.scope must be 'minibatch' or 'microbatch', got {self.scope!r}")


# ----------------------------------------------------------------------
# losses.py
LOSS_AGG_MODES = ("token-mean", "informative-token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
R2VPO_CENTERS = ("one", "batch_mean")
R2VPO_DUAL_UPDATES = ("additive", "multiplicative")


@dataclass(frozen=True)
class PolicyLossConfig:
    """``policy_loss`` config (grpo_base.md §4-§5).

    loss_agg_mode: ``token-mean`` (sum of token losses / N, N = the mini-batch's valid tokens),
        ``informative-token-mean`` (the same sum / the valid tokens of rows with a non-zero raw GRPO
        advantage: zero-variance groups add their KL / R2VPO terms to the sum but not to N, so their
        share of the batch does not shrink the step), ``seq-mean-token-mean`` or
        ``seq-mean-token-sum-norm`` (Dr.GRPO, needs ``norm_constant``).
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    loss_agg_mode: str = "token-mean"
    norm_constant: float | None = None

    def __post_init__(self) -> None:
        p = "policy_loss"
        if not (is_real(self.eps_low) and 0.0 <= self.eps_low < 1.0):
            raise ValueError(f"{p}.eps_low must be in [0, 1), got {self.eps_low}")
        if not (is_real(self.eps_high) and 0.0 <= self.eps_high < math.inf):
            raise ValueError(f"{p}.eps_high must be a finite number >= 0, got {self.eps_high}")
        if self.dual_clip is not None and not (is_real(self.dual_clip) and 1.0 < self.dual_clip < math.inf):
            raise ValueError(f"{p}.dual_clip must be > 1 (or null to disable), got {self.dual_clip}")
        if not (is_real(self.kl_coef) and 0.0 <= self.kl_coef < math.inf):
            raise ValueError(f"{p}.kl_coef must be a finite number >= 0, got {self.kl_coef}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"{p}.loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.norm_constant is not None and not (is_real(self.norm_constant) and 0.0 < self.norm_constant < math.inf):
            raise ValueError(f"{p}.norm_constant must be > 0 (or null), got {self.norm_constant}")
        if self.loss_agg_mode == "seq-mean-token-sum-norm" and self.norm_constant is None:
            raise ValueError(f"{p}.norm_constant is required when {p}.loss_agg_mode is 'seq-mean-token-sum-norm'")


@dataclass(frozen=True)
class R2VPOConfig:
    """``r2vpo`` config (r2vpo.md §1-§3)."""

    delta: float = 0.04
    dual_update: str = "additive"
    eta_lam: float = 10.0
    eta_mult: float = 0.2
    lam_init: float | None = None
    lam_max: float = 100.0
    lam_min: float = 1e-3
    center: str = "one"
    max_ratio: float | None = None

    def __post_init__(self) -> None:
        p = "r2vpo"

        def finite(x: Any) -> bool:
            return is_real(x) and math.isfinite(x)

        if not (finite(self.delta) and self.delta > 0):
            raise ValueError(f"{p}.delta must be > 0, got {self.delta}")
        if self.dual_update not in R2VPO_DUAL_UPDATES:
            raise ValueError(f"{p}.dual_update must be one of {R2VPO_DUAL_UPDATES}, got {self.dual_update!r}")
        # 0 is allowed for both step sizes: a frozen lam is the fixed-penalty
        # (CFPO-style) comparison run.
        if not (finite(self.eta_lam) and self.eta_lam >= 0):
            raise ValueError(f"{p}.eta_lam must be a finite number >= 0, got {self.eta_lam}")
        if not (finite(self.eta_mult) and self.eta_mult >= 0):
            raise ValueError(f"{p}.eta_mult must be a finite number >= 0, got {self.eta_mult}")
        if not (finite(self.lam_max) and self.lam_max > 0):
            raise ValueError(f"{p}.lam_max must be a finite number > 0, got {self.lam_max}")
        if not (finite(self.lam_min) and 0 < self.lam_min <= self.lam_max):
            raise ValueError(f"{p}.lam_min must be in (0, lam_max={self.lam_max}], got {self.lam_min}")
        if self.lam_init is not None:
            lo = self.lam_min if self.dual_update == "multiplicative" else 0.0
            if not (finite(self.lam_init) and lo <= self.lam_init <= self.lam_max):
                raise ValueError(
                    f"{p}.lam_init must be in [{lo}, lam_max={self.lam_max}] for dual_update "
                    f"{self.dual_update!r} (or null for the default), got {self.lam_init}"
                )
        if self.center not in R2VPO_CENTERS:
            raise ValueError(f"{p}.center must be one of {R2VPO_CENTERS}, got {self.center!r}")
        if self.max_ratio is not None and not (finite(self.max_ratio) and self.max_ratio > 1):
            raise ValueError(f"{p}.max_ratio must be > 1 (or null to disable), got {self.max_ratio}")

    @property
    def initial_lam(self) -> float:
        """``lam_init``, or its per-rule default (0.0 additive, 0.1 multiplicative)."""
        if self.lam_init is not None:
            return float(self.lam_init)
        return 0.0 if self.dual_update == "additive" else 0.1



# ----------------------------------------------------------------------
# trainer/replay.py
@dataclass(frozen=True)
class ReplayConfig:
    """``replay``: off-policy reuse of earlier prompt groups, with any loss (r2vpo.md §3).

    ratio: replayed groups per fresh group of a step (0 = on-policy; 1.0 = each step trains
        on the fresh batch plus as many replayed groups).
    staleness: groups generated more than this many policy versions (RL steps) ago are dropped.

    With ``loss: r2vpo`` the ratio against each row's own behaviour policy and the variance brake
    down-weight stale rows; with ``loss: clipped`` the clip range does (the control run that
    separates R2VPO's loss from the reuse itself).
    """

    ratio: float = 0.0
    staleness: int = 1

    def __post_init__(self) -> None:
        if not (is_real(self.ratio) and math.isfinite(self.ratio) and self.ratio >= 0):
            raise ValueError(f"replay.ratio must be a finite number >= 0, got {self.ratio}")
        if not (is_int(self.staleness) and self.staleness >= 0):
            raise ValueError(f"replay.staleness must be an integer >= 0, got {self.staleness!r}")
