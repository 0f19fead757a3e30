"""CPU rollout engine on a Hugging Face ``transformers`` causal LM.

The actor's weights arrive after every update in the Hugging Face layout
(``load_weights``); ``generate`` samples ``n_i`` responses for prompt ``i`` of a
step -- any ``n_i >= 1``, all prompts in one batched ``model.generate`` call --
and returns a ``RolloutBatch`` with an explicit ``group_index``.

Behaviour log-probs are not taken from the engine: the actor recomputes them
with the training model, so the engine's numerics never leak into the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nemo_gdro.data.dataset import PromptRecord
from nemo_gdro.data.tokenizer import CharTokenizer
from nemo_gdro.rollout.batch import RolloutBatch, response_mask_from_lengths


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling options.

    temperature: softmax temperature (> 0) when sampling.
    top_p: nucleus mass in ``(0, 1]``; 1.0 disables.
    top_k: keep the ``k`` most likely tokens; 0 disables.
    max_new_tokens: response length cap in tokens (including ``<eos>``).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed mixed from ``(seed, step)`` (nearby steps give unrelated streams)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class HFRolloutEngine:
    """Batched sampling from a ``transformers`` causal LM built from ``hf_config``.

    Args:
        hf_config: a ``transformers`` config (e.g. ``Qwen3Config``) whose
            ``vocab_size`` is at least ``tokenizer.vocab_size``.
        tokenizer: the character tokenizer (pad / bos / eos ids).
        sampling: sampling options.
        seed: base seed; step ``t`` samples with ``step_seed(seed, t)``.
        add_bos: prepend ``<bos>`` to every prompt (the actor must tokenize
            identically; it reads the tokens from the batch, so it does).

    The model is fp32, eval mode, on CPU, with random initial weights and
    ``policy_version = -1`` until the first ``load_weights``.
    """

    def __init__(
        self,
        hf_config: object,
        tokenizer: CharTokenizer,
        sampling: SamplingConfig | None = None,
        *,
        seed: int = 0,
        add_bos: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM

        vocab = int(getattr(hf_config, "vocab_size"))
        if vocab < tokenizer.vocab_size:
            raise ValueError(f"hf_config.vocab_size = {vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
        self.tokenizer = tokenizer
        self.sampling = sampling or SamplingConfig()
        self.seed = int(seed)
        self.add_bos = add_bos
        # Model construction draws random init weights: keep the caller's RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(hf_config)
        self.model = model.to(device="cpu", dtype=torch.float32).eval()
        self.policy_version = -1

    # ------------------------------------------------------------- weights
    @torch.no_grad()
    def load_weights(self, hf_state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy a full HF-layout state dict into the model (strict: same keys and shapes).

        With tied embeddings, a missing ``lm_head.weight`` is accepted (it is the
        embedding); a present one must equal the embedding. Raises ``ValueError`` listing missing / unexpected keys and
        shape mismatches; the model is left unchanged on error.
        """
        own = self.model.state_dict()
        given = dict(hf_state_dict)
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
        step: int,
        *,
        greedy: bool = False,
    ) -> RolloutBatch:
        """Sample ``n_per_prompt[i]`` responses for ``records[i]``.

        Args:
            records: the step's ``P`` prompts (prompt position ``i`` = ``records[i]``).
            n_per_prompt: int ``[P]``, each ``>= 1``.
            step: training step; with the engine's seed it fixes the random
                stream, so the same ``(seed, step, records, n)`` gives the same
                batch, and the caller's global RNG state is left untouched.
            greedy: argmax decoding (evaluation); sampling options are ignored.

        Returns a validated ``RolloutBatch`` with ``R = sum(n)`` rows, grouped by
        prompt in order (rows of prompt ``i`` have ``group_index == i``).
        ``responses`` are the decoded response tokens without the final
        ``<eos>``, with any other special token rendered literally (``"<pad>"``)
        so that the verifier scores it as wrong rather than silently dropping it;
        ids outside the tokenizer's vocabulary (padded embedding rows) decode to
        U+FFFD.
        """
        n = torch.as_tensor(n_per_prompt, dtype=torch.int64).flatten()
        P = len(records)
        if n.numel() != P:
            raise ValueError(f"n_per_prompt has {n.numel()} entries for {P} prompts")
        if P == 0:
            raise ValueError("generate needs at least one prompt")
        if int(n.min()) < 1:
            raise ValueError(f"every n_per_prompt must be >= 1, got {n.tolist()}")
        tok = self.tokenizer
        group_index = torch.repeat_interleave(torch.arange(P), n)
        R = int(group_index.numel())

        prompt_ids_per_prompt = [tok.encode(r.prompt, add_bos=self.add_bos) for r in records]
        if min(len(p) for p in prompt_ids_per_prompt) == 0:
            empty = [r.prompt_id for r, p in zip(records, prompt_ids_per_prompt, strict=True) if not p]
            raise ValueError(f"prompts {empty} encode to no tokens (use add_bos=True or non-empty prompts)")
        prompt_len = torch.tensor([len(p) for p in prompt_ids_per_prompt], dtype=torch.int64)[group_index]
        L = int(prompt_len.max())

        # Left-padded prompts: generation appends at the right for every row at once.
        input_ids = torch.full((R, L), tok.pad_id, dtype=torch.int64)
        for r, g in enumerate(group_index.tolist()):
            p = prompt_ids_per_prompt[g]
            input_ids[r, L - len(p) :] = torch.as_tensor(p, dtype=torch.int64)
        attention_mask = torch.arange(L).unsqueeze(0) >= (L - prompt_len).unsqueeze(1)

        out = self._generate(input_ids, attention_mask.long(), step, greedy)
        gen = out[:, L:]  # [R, G], G <= max_new_tokens
        G = gen.shape[1]

        # A row ends at its first eos (kept in the response); rows without eos ran to
        # max_new_tokens (generation only stops early once every row has an eos).
        is_eos = gen == tok.eos_id
        has_eos = is_eos.any(1)
        first_eos = is_eos.to(torch.int8).argmax(1)  # 0 for rows without eos; masked below
        response_len = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, G))

        # Re-lay out as right-padded [prompt | response | pad]: shift each row left by
        # its amount of left padding.
        S = int((prompt_len + response_len).max())
        j = torch.arange(S).unsqueeze(0)
        src = (j + (L - prompt_len).unsqueeze(1)).clamp(max=out.shape[1] - 1)
        valid = j < (prompt_len + response_len).unsqueeze(1)
        tokens = torch.where(valid, out.gather(1, src), torch.full_like(src, tok.pad_id))

        responses = []
        for r in range(R):
            resp = gen[r, : int(response_len[r])].tolist()
            if has_eos[r]:
                resp = resp[:-1]
            responses.append(tok.decode(resp, skip_special=False, on_unknown="replace"))

        step_prompt_ids = torch.tensor([r.prompt_id for r in records], dtype=torch.int64)
        batch = RolloutBatch(
            tokens=tokens,
            prompt_lengths=prompt_len,
            response_lengths=response_len,
            response_mask=response_mask_from_lengths(prompt_len, response_len, S),
            group_index=group_index,
            prompt_ids=step_prompt_ids[group_index],
            step_prompt_ids=step_prompt_ids,
            answers=[records[g].answer for g in group_index.tolist()],
            responses=responses,
            policy_version=self.policy_version,
            pad_id=tok.pad_id,
            truncated=~has_eos,
        )
        return batch.validate()

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int, greedy: bool) -> torch.Tensor:
        from transformers import GenerationConfig

        s = self.sampling
        tok = self.tokenizer
        common = dict(
            max_new_tokens=s.max_new_tokens,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            bos_token_id=tok.bos_id,
            num_beams=1,
            use_cache=True,
        )
        if greedy:
            cfg = GenerationConfig(do_sample=False, **common)
        else:
            # top_k must be given explicitly: transformers fills an unset top_k with 50.
            cfg = GenerationConfig(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, **common)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(self.seed, step))
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg)
        return out
