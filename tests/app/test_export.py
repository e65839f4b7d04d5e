"""``streamrl export`` of a LoRA checkpoint (adapter folder + merged Hugging Face model) and
``streamrl eval`` on either folder."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from streamrl.cli import main
from streamrl.common.config import LoraSection
from streamrl.common.lora import apply_lora, is_adapter_folder
from streamrl.common.models import load_causal_lm, load_tokenizer, save_tiny_model
from streamrl.evaluation import evaluate
from streamrl.services.learner.checkpoint import save_checkpoint
from support import tiny_eval_config


def lora_checkpoint(tmp_path):
    """A base model folder and a learner checkpoint of a LoRA policy on it with moved adapters."""
    base = save_tiny_model(tmp_path / "base", seed=0)
    lora = apply_lora(load_causal_lm(str(base), device=torch.device("cpu")), LoraSection(rank=4, alpha=8.0))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    folder = save_checkpoint(
        tmp_path / "checkpoints",
        step=1,
        version=1,
        policy=lora,
        tokenizer=load_tokenizer(str(base)),
        trainer_state={},
    )
    return base, lora.eval(), folder


def test_export_writes_the_adapter_and_a_merged_model_with_the_same_logits(tmp_path, capsys):
    base, lora, checkpoint = lora_checkpoint(tmp_path)
    config = tmp_path / "job.toml"
    config.write_text(f'[model]\npath = "{base}"\n')
    out = tmp_path / "export"
    try:
        main(["export", "--config", str(config), "--checkpoint", str(checkpoint), "--output", str(out)])
    except SystemExit as done:
        assert done.code == 0
    assert f"merged: {out / 'merged'}" in capsys.readouterr().out
    assert is_adapter_folder(out / "adapter")
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert not any("lora" in name for name in merged.state_dict())  # a plain model
    ids = torch.tensor([[3, 17, 40, 8, 25, 61, 9]])
    with torch.no_grad():
        want = lora(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base_logits = load_causal_lm(str(base), device=torch.device("cpu"))(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # fp32, merged vs unmerged rounding
    assert (want - base_logits).abs().max() > 1e-2  # the adapter changes the function
    assert load_tokenizer(str(out / "merged")).get_vocab() == load_tokenizer(str(base)).get_vocab()


def test_eval_takes_an_adapter_folder_or_the_merged_model(tmp_path):
    base, _, checkpoint = lora_checkpoint(tmp_path)
    cfg = tiny_eval_config(base)
    main_args = ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "export")]
    try:
        main([*main_args, "--set", f"model.path={base}"])
    except SystemExit as done:
        assert done.code == 0
    adapter = evaluate(cfg, str(checkpoint / "model"), limit=4, seed=3)
    merged = evaluate(cfg, str(tmp_path / "export" / "merged"), limit=4, seed=3)
    assert [s["completion"] for s in adapter.samples] == [s["completion"] for s in merged.samples]
    assert abs(adapter.reward_mean - merged.reward_mean) < 1e-9
    assert adapter.kl_per_token > 0 and abs(adapter.kl_per_token - merged.kl_per_token) < 1e-4
