"""The inference engine behind a generator: one interface, two engines (``generator.engine``).

A :class:`SamplingEngine` samples G completions per prompt with their behaviour log-probs
(the log-probability of each sampled token under the distribution it was drawn from, after
temperature and top-p: the behaviour policy mu of the learner's importance ratios) and
loads a new policy version in place. The generator loop, ``streamrl eval`` and the run's
held-out evaluation use it and never see which engine runs underneath:

- :class:`HFEngine`: Hugging Face ``generate`` on the process's own model copy
  (:func:`streamrl.services.generator.sampling.sample_completions`); weights are adopted
  zero-copy from the receive buffer (:meth:`WeightClient.load_into`).
- :class:`streamrl.services.generator.vllm_engine.VLLMEngine`: vLLM in the same process.

Both load a version completely before the next :meth:`SamplingEngine.sample` call, so a
batch never mixes versions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from streamrl.common.lora import AdapterMerger
from streamrl.common.messages import AdapterSpec, SamplingParams
from streamrl.common.models import load_causal_lm
from streamrl.common.modes import Engine
from streamrl.common.weights import FetchedWeights, WeightClient, tied_duplicates
from streamrl.services.generator.sampling import Completion, sample_completions
from streamrl.services.generator.versions import check_fit

log = logging.getLogger(__name__)


class SamplingEngine(Protocol):
    """What a generator needs from an inference engine."""

    name: str
    """``"hf"`` or ``"vllm"`` (the ``generator.engine`` value)."""

    def sample(self, prompts: list[list[int]], *, group_size: int, sampling: SamplingParams) -> list[list[Completion]]:
        """``group_size`` completions per prompt (token ids, after truncation), in input order, each
        with its ``[T]`` float32 behaviour log-probs (nats) under temperature and top-p.

        Raises:
            ValueError: a sampling setting the learner cannot reproduce.
        """

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load a whole policy (Hugging Face parameter names; tied duplicates may be absent) in place.

        Raises:
            RuntimeError: the tensors do not fit the model (missing or unexpected names, shapes).
        """

    def load_fetched(self, weights: WeightClient, fetched: FetchedWeights) -> None:
        """Load a verified version from the weight client's receive buffer (zero-copy where the engine
        can adopt it; a LoRA adapter, ``fetched.adapter``, through :meth:`load_adapter`). Same errors
        as :meth:`load_state_dict` and :meth:`load_adapter`."""

    def load_adapter(self, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec) -> None:
        """Load a LoRA adapter version in place: every adapted layer's weight becomes
        ``W0 + (alpha / r) B A`` (:class:`~streamrl.common.lora.AdapterMerger`, from the base ``W0`` of
        this engine's own checkpoint, never from the previous version); other layers keep the base.

        Raises:
            ValueError: malformed adapter tensors.
            RuntimeError: the adapter does not fit the base model (layers or shapes).
        """

    def close(self) -> None:
        """Free the engine (idempotent)."""


class HFEngine:
    """Hugging Face ``generate`` on a model held by this process (see module docstring).

    Args:
        model: the causal LM (eval mode, on its device); the engine samples with it and loads
            new versions into it.
        tokenizer: its tokenizer (pad and eos tokens set).
        autocast_bf16: sample under bf16 autocast (the recorded log-probs are those of the bf16
            logits that were sampled).
    """

    name = Engine.HF.value

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        autocast_bf16: bool = False,
        path: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.model = model
        self.autocast_bf16 = autocast_bf16
        self.tied = tied_duplicates(self.model.state_dict())
        self.merger = AdapterMerger(path, dtype=model.dtype) if path is not None else None

    def sample(self, prompts: list[list[int]], *, group_size: int, sampling: SamplingParams) -> list[list[Completion]]:
        return sample_completions(
            self.model,
            self.tokenizer,
            prompts,
            group_size=group_size,
            sampling=sampling,
            autocast_bf16=self.autocast_bf16,
        )

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(dict(tensors), strict=False)
        check_fit(missing, unexpected, self.tied)

    def load_fetched(self, weights: WeightClient, fetched: FetchedWeights) -> None:
        if fetched.adapter is not None:
            self.load_adapter(fetched.tensors, fetched.adapter)
            return
        missing, unexpected = weights.load_into(self.model, fetched)  # zero-copy where it can
        check_fit(missing, unexpected, self.tied)

    def load_adapter(self, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec) -> None:
        if self.merger is None:
            raise RuntimeError("this HF engine was built without its checkpoint path: it cannot merge adapters")
        self.merger.merge(tensors, spec, out=dict(self.model.named_parameters()))  # straight into them

    def close(self) -> None:
        pass


def build_engine(
    engine: Engine,
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: torch.device,
    autocast_bf16: bool,
    max_model_len: int,
    kv_cache_gib: float,
    threads: int,
    seed: int,
) -> SamplingEngine:
    """The engine ``generator.engine`` names, holding the model at ``path``.

    Args:
        engine: which engine.
        path: Hugging Face model folder (the generator's base model).
        tokenizer: its tokenizer.
        device: where it runs.
        autocast_bf16: bf16 compute (HF: autocast; vLLM: bf16 weights and activations).
        max_model_len: prompt + completion budget, tokens (vLLM sizes its batches by it).
        kv_cache_gib: vLLM's KV-cache memory, GiB.
        threads: torch threads for the engine (vLLM's CPU backend reads them at start).
        seed: the engine's sampling seed (vLLM; HF samples from torch's global generator).

    Raises:
        RuntimeError: ``vllm`` without vLLM installed (the message says how to install it).
    """
    if engine is Engine.VLLM:
        from streamrl.services.generator.vllm_engine import VLLMEngine  # optional dependency, slow import

        return VLLMEngine(
            path,
            tokenizer,
            device=device,
            bf16=autocast_bf16,
            max_model_len=max_model_len,
            kv_cache_gib=kv_cache_gib,
            threads=threads,
            seed=seed,
        )
    return HFEngine(load_causal_lm(path, device=device).eval(), tokenizer, autocast_bf16=autocast_bf16, path=path)
