"""``streamrl export``: a checkpoint as the folders other tools load.

A LoRA checkpoint (``learner.lora``: its ``model/`` is a PEFT adapter folder) becomes

* ``<output>/adapter/``: the adapter folder as PEFT saved it (``PeftModel.from_pretrained(base, it)``,
  vLLM's and TGI's LoRA loaders), with the tokenizer;
* ``<output>/merged/``: a plain Hugging Face model with ``W = W0 + (alpha / r) B A`` merged into the
  base (PEFT's ``merge_and_unload``), loadable with ``AutoModelForCausalLM.from_pretrained``.

A whole-model checkpoint becomes ``<output>/merged/`` (a copy). ``streamrl eval --checkpoint`` takes
any of these folders.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from streamrl.common.lora import is_adapter_folder, load_lora
from streamrl.common.models import load_causal_lm, load_tokenizer


def export_model(checkpoint: str | Path, output: str | Path, *, base: str) -> dict[str, Path]:
    """Write ``checkpoint`` (a checkpoint folder ``step-NNNNNN`` or its ``model/``) under ``output``.

    Args:
        checkpoint: the checkpoint or model folder.
        output: the export folder (created; ``adapter/`` and ``merged/`` are replaced).
        base: the base model folder a LoRA adapter was trained on (``model.path``, resolved).

    Returns:
        ``{"adapter": folder, "merged": folder}`` (``adapter`` only for a LoRA checkpoint).

    Raises:
        FileNotFoundError: ``checkpoint`` is neither a model nor an adapter folder.
    """
    source = Path(checkpoint)
    if (source / "model").is_dir():
        source = source / "model"
    if not is_adapter_folder(source) and not (source / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} holds neither a model (config.json) nor a LoRA adapter folder")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    merged = output / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    if not is_adapter_folder(source):
        shutil.copytree(source, merged)
        return {"merged": merged}
    written["adapter"] = output / "adapter"
    shutil.rmtree(written["adapter"], ignore_errors=True)
    shutil.copytree(source, written["adapter"])
    model = load_lora(load_causal_lm(base, device=torch.device("cpu")), source, trainable=False)
    model.merge_and_unload().save_pretrained(merged)
    has_tokenizer = any(source.glob("tokenizer*"))
    load_tokenizer(str(source) if has_tokenizer else base).save_pretrained(merged)
    written["merged"] = merged
    return written
