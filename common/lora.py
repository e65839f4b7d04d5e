"""LoRA policies (``learner.lora``): the learner trains adapters with PEFT, only the adapters travel,
and every generator merges them into its own copy of the base.

Hu et al. 2021 ("LoRA: Low-Rank Adaptation of Large Language Models", eq. 3): an adapted linear
layer computes ``h = W0 x + (alpha / r) B A x`` with the base ``W0`` (``[out, in]``) frozen and
``A`` (``[r, in]``), ``B`` (``[out, r]``) trained; ``B`` starts at 0, so version 0 is the base.

- Learner: :func:`apply_lora` wraps the policy in a PEFT ``PeftModel`` (dropout 0: the learner and
  the generators compute the same function). The reference model is the same module with the
  adapters disabled (``PeftModel.disable_adapter()``): no second copy of the weights.
- Wire: :func:`adapter_tensors` names each adapter tensor after the base model's module,
  ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, and :func:`adapter_spec` describes the
  adapter (:class:`~streamrl.common.messages.AdapterSpec`) in the version's announcement, whose
  ``model_fingerprint`` is the base's (:mod:`streamrl.common.fingerprint`).
- Generators: :class:`AdapterMerger` keeps the base ``W0`` of every adapted layer (read once from
  the generator's own checkpoint) and computes ``W = W0 + (alpha / r) B A`` for each version from
  ``W0``, never from the previous version's merged weight, so rounding never accumulates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from streamrl.common.messages import AdapterSpec

if TYPE_CHECKING:  # for the type checker only: no import of peft (nor typing_extensions) at run time
    from peft import PeftModel
    from typing_extensions import TypeIs

ADAPTER_CONFIG = "adapter_config.json"
"""The file that marks a PEFT adapter folder (``PeftModel.save_pretrained``)."""

_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_PEFT_PREFIX = "base_model.model."  # PEFT's state-dict names: the wrapped model's under this prefix


def is_adapter_folder(path: str | Path) -> bool:
    """True when ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(folder: str | Path) -> str:
    """The base model an adapter folder was trained on (``base_model_name_or_path`` of its config)."""
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def lora_config(section, *, causal_lm: bool = True):
    """PEFT's ``LoraConfig`` for a ``[learner.lora]`` section
    (:class:`~streamrl.common.config.LoraSection`): no bias, dropout 0, plain ``alpha / r`` scaling (no
    rsLoRA, no DoRA: the generators merge exactly that); task ``CAUSAL_LM``, or none (another head, such
    as a reward model's, which the caller trains or freezes itself)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM if causal_lm else None,
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=0.0,
        target_modules=list(section.target_modules),
        bias="none",
        use_rslora=False,
        use_dora=False,
    )


def apply_lora(model: torch.nn.Module, section, *, causal_lm: bool = True):
    """Wrap ``model`` (a Hugging Face causal LM; ``causal_lm=False``: any model, e.g. a sequence
    classifier) in a trainable PEFT ``PeftModel`` with fresh adapters.

    Only the adapter weights require gradients afterwards; ``B = 0``, so the wrapped model computes
    exactly what ``model`` did.

    Raises:
        ValueError: a target module matches no layer of ``model`` (PEFT's message names it).
    """
    from peft import get_peft_model

    return get_peft_model(model, lora_config(section, causal_lm=causal_lm))


def load_lora(model: torch.nn.Module, folder: str | Path, *, trainable: bool):
    """The adapter saved in ``folder`` (``PeftModel.save_pretrained``) on top of base ``model``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)


def is_lora(model: object) -> TypeIs[PeftModel]:
    """True for a PEFT ``PeftModel`` (:func:`apply_lora`, :func:`load_lora`)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def adapter_spec(model) -> AdapterSpec:
    """The announcement's description of ``model``'s (a ``PeftModel``) active adapter."""
    config = model.peft_config[model.active_adapter]
    return AdapterSpec(rank=int(config.r), alpha=float(config.lora_alpha), target_modules=sorted(config.target_modules))


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter weights of ``model`` (a ``PeftModel``), named after the base model's modules.

    Returns:
        ``{"<module>.lora_A.weight": [r, in], "<module>.lora_B.weight": [out, r]}`` for every adapted
        layer, ``<module>`` as in the base model's ``state_dict`` (``model.layers.0.self_attn.q_proj``);
        the tensors are the live parameters (detached, not copies).
    """
    from peft import get_peft_model_state_dict

    out = {}
    for name, tensor in get_peft_model_state_dict(model).items():
        if not name.endswith(_SUFFIXES):
            raise ValueError(f"{name}: only LoRA A and B weights can be sent as an adapter")
        out[name.removeprefix(_PEFT_PREFIX)] = tensor.detach()
    return out


def wire_state(model) -> dict[str, torch.Tensor]:
    """What a version of ``model`` sends: its adapter (:func:`adapter_tensors`) for a LoRA policy,
    else its whole ``state_dict``."""
    return adapter_tensors(model) if is_lora(model) else model.state_dict()


def adapted_layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"<module>.weight": (A, B)}`` from :func:`adapter_tensors`' names.

    Raises:
        ValueError: a name that is not an adapter weight, a layer with only one of A and B, or shapes
            that do not chain (``A [r, in]``, ``B [out, r]``).
    """
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{name}: not a LoRA adapter weight (<module>.lora_A.weight or .lora_B.weight)")
        layers.setdefault(name.removesuffix(suffix) + ".weight", {})[suffix] = tensor
    out = {}
    for target, pair in layers.items():
        if len(pair) != 2:
            raise ValueError(f"{target}: the adapter holds only {sorted(pair)}")
        a, b = pair[".lora_A.weight"], pair[".lora_B.weight"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{target}: A {list(a.shape)} and B {list(b.shape)} do not chain")
        out[target] = (a, b)
    return out


def read_base_weights(path: str | Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the safetensors checkpoint in Hugging Face folder ``path``.

    Raises:
        RuntimeError: a name the checkpoint does not hold.
    """
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in names & set(handle.keys()):
                found[name] = handle.get_tensor(name)
    missing = sorted(names - set(found))
    if missing:
        raise RuntimeError(f"the adapter does not fit the base model at {path}: it has no {missing[:3]}")
    return found


class AdapterMerger:
    """Merges adapter versions into base weights: ``W = W0 + (alpha / r) B A``, always from ``W0``.

    Args:
        path: the generator's base model folder (safetensors); the ``W0`` of each adapted layer is read
            from it the first time a layer is adapted, and kept (a copy per adapted layer).
        dtype: the dtype of the merged weights (the engine's parameters; the merge runs in float32).
    """

    def __init__(self, path: str | Path, *, dtype: torch.dtype = torch.float32):
        self.path = path
        self.dtype = dtype
        self.base: dict[str, torch.Tensor] = {}

    def base_weights(self, names: set[str]) -> dict[str, torch.Tensor]:
        """``W0`` of ``names`` (float32), read from the checkpoint the first time each is asked for."""
        new = names - set(self.base)
        if new:
            self.base.update({k: v.float() for k, v in read_base_weights(self.path, new).items()})
        return {name: self.base[name] for name in names}

    @torch.no_grad()
    def merge(
        self,
        tensors: Mapping[str, torch.Tensor],
        spec: AdapterSpec,
        out: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The merged weight of every layer the adapter adapts.

        Args:
            tensors: the version's adapter tensors (:func:`adapter_tensors` names), any float dtype.
            spec: the announcement's adapter description (rank, alpha).
            out: ``{"<module>.weight": tensor}`` to write the merged weights into (an engine's own
                parameters): float32 CPU ones in one pass (``addmm`` from ``W0``, no temporary), others
                through a float32 temporary. None: new tensors in ``dtype``.

        Returns:
            ``{"<module>.weight": [out, in] tensor}`` (the ``out`` tensors where given).

        Raises:
            ValueError: malformed adapter tensors.
            RuntimeError: the adapter does not fit the base (a layer the checkpoint lacks, or shapes,
                or a rank other than ``spec.rank``).
        """
        layers = adapted_layers(tensors)
        base = self.base_weights(set(layers))
        merged = {}
        for name, (a, b) in layers.items():
            w0 = base[name]
            if a.shape[0] != spec.rank or (b.shape[0], a.shape[1]) != tuple(w0.shape):
                raise RuntimeError(
                    f"the adapter does not fit the base: {name} is {list(w0.shape)}, A {list(a.shape)}, "
                    f"B {list(b.shape)}, rank {spec.rank}"
                )
            if out is not None and name not in out:
                raise RuntimeError(f"the adapter does not fit the model: it has no parameter {name}")
            target = out[name] if out is not None else None
            # W0 + scaling * (B @ A), PEFT's merge (LoraLayer.get_delta_weight) in one fused pass
            if target is not None and target.dtype == w0.dtype and target.device == w0.device:
                merged[name] = torch.addmm(w0, b.float(), a.float(), alpha=spec.scaling, out=target)
            elif target is not None:
                merged[name] = target.copy_(torch.addmm(w0, b.float(), a.float(), alpha=spec.scaling))
            else:
                merged[name] = torch.addmm(w0, b.float(), a.float(), alpha=spec.scaling).to(self.dtype)
        return merged
