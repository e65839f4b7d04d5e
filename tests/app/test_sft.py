"""``streamrl sft`` on the tiny model: response-only loss, held-out loss falls, HF folder out."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamrl.common.config import validate_config
from streamrl.stages.finetune import StageError, Trunk
from streamrl.stages.rlhf_data import parse_row
from streamrl.stages.rlhf_losses import response_nll
from streamrl.stages.sft import encode_demonstration, response_loss, run_sft


def copy_task(path: Path, rows: int = 120, seed: int = 0) -> Path:
    """Prompts ``say <word>:`` whose demonstration repeats the word."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        word = "".join(rng.choice("abcdef") for _ in range(6))
        lines.append(json.dumps({"prompt": f"say {word}:", "response": f" {word} ok"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_config(tmp_path: Path, model: Path, data: Path, eval_rows: int = 20, **sft) -> object:
    section = {
        "base_model": str(model),
        "data": {"path": str(data), "eval_rows": eval_rows},
        "epochs": 3,
        "batch_size": 8,
        "lr": 3e-3,
        "threads": 1,
        **sft,
    }
    return validate_config({"run": {"output_dir": str(tmp_path / "run")}, "sft": section})


def test_encode_demonstration_masks_the_prompt_and_ends_with_eos(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = parse_row({"prompt": "abc:", "response": " xy"}, row_number=1)
    ids, mask = encode_demonstration(example, tokenizer, chat_template=False, system_prompt=None, max_length=64)
    assert tokenizer.decode(ids[:4]) == "abc:" and ids[-1] == tokenizer.eos_token_id
    assert mask == [0, 0, 0, 0, 1, 1, 1, 1]
    ids, mask = encode_demonstration(example, tokenizer, chat_template=False, system_prompt=None, max_length=6)
    assert tokenizer.decode(ids[:2]) == "c:" and mask == [0, 0, 1, 1, 1, 1]  # the prompt's start is cut


def test_stage_loss_is_the_response_nll_of_the_full_logits(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [
        parse_row({"prompt": p, "response": r}, row_number=1) for p, r in [("ab:", " c"), ("long prompt", " z")]
    ]
    encoded = [
        encode_demonstration(e, tokenizer, chat_template=False, system_prompt=None, max_length=64) for e in examples
    ]
    with torch.no_grad():
        total, count = response_loss(
            Trunk(model, trainable_layers=None),
            [e[0] for e in encoded],
            [e[1] for e in encoded],
            pad_id=tokenizer.pad_token_id,
        )
        width = max(len(e[0]) for e in encoded)
        ids = torch.tensor([e[0] + [0] * (width - len(e[0])) for e in encoded])
        mask = torch.tensor([e[1] + [0] * (width - len(e[1])) for e in encoded])
        logits = model(
            input_ids=ids, attention_mask=(torch.arange(width) < torch.tensor([[len(e[0])] for e in encoded])).long()
        ).logits
        expected_total, expected_count = response_nll(logits, ids, mask)
    assert count.item() == expected_count.item() == 2 + 2 + 2  # " c"+eos, " z"+eos
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-5)


@pytest.mark.parametrize("trainable", [0, 1, 2])
def test_frozen_cached_trunk_gives_the_same_loss(tiny_model_dir, trainable):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sequences = [tokenizer("hello world")["input_ids"], tokenizer("hi")["input_ids"]]
    masks = [[0] * 6 + [1] * 5, [0, 1]]
    full = Trunk(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), trainable_layers=None)
    cached = Trunk(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), trainable_layers=trainable, cache=True)
    cached.precompute(sequences, pad_id=0, batch_size=1)  # cached one at a time, used padded together
    with torch.no_grad():
        a = response_loss(full, sequences, masks, pad_id=0)[0]
        b = response_loss(cached, sequences, masks, pad_id=0)[0]
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    assert cached.frozen == 2 - trainable and not any(p.requires_grad for p in cached.base.embed_tokens.parameters())
    assert all(
        p.requires_grad == (i >= 2 - trainable)
        for i, block in enumerate(cached.base.layers)
        for p in block.parameters()
    )
    assert all(p.requires_grad for p in cached.base.norm.parameters())


@pytest.mark.slow
def test_sft_lowers_heldout_loss_and_writes_a_causal_lm(tiny_model_dir, tmp_path):
    config = sft_config(tmp_path, tiny_model_dir, copy_task(tmp_path / "d.jsonl"))
    summary = run_sft(config, log=lambda line: None)
    assert summary["train_rows"] == 100 and summary["heldout_rows"] == 20
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] - 1.0  # 4.5 -> ~1.4 nats/token
    folder = Path(summary["output_dir"])
    assert (folder / "COMPLETE").is_file() and json.loads((folder / "summary.json").read_text()) == summary
    model = AutoModelForCausalLM.from_pretrained(folder)  # usable as model.path / the reference
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("say abcdef:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert tokenizer.decode(out[0, prompt.shape[1] :]).startswith(" ")  # learned the response format
    from streamrl.common.prompts import load_jsonl

    prompts = load_jsonl(folder / "prompts.jsonl")  # a prompt source for PPO's generators
    assert len(prompts) == 100 and prompts[0].text.startswith("say ")
    assert len(load_jsonl(folder / "heldout_prompts.jsonl")) == 20
    demo = load_jsonl(folder / "demonstrations.jsonl")[0].text  # PPO-ptx data: prompt + response + EOS
    assert demo.startswith("say ") and demo.endswith(" ok<eos>")
    lines = []
    again = run_sft(config, log=lines.append)  # complete: skipped
    assert again == summary and "skipped" in lines[0]


@pytest.mark.slow
def test_prompt_tokens_are_not_trained_on(tiny_model_dir, tmp_path):
    """Prompts are long runs of 'z', responses never contain it: trained on the prompt too, the
    model learns that 'z' follows 'z' (measured with the mask forced to 1 everywhere: p 0.015 ->
    0.19); with the prompt masked it stays near its initial value (0.015 -> 0.02)."""
    rng = random.Random(1)
    rows = [
        {"prompt": "z" * (20 + i), "response": " " + "".join(rng.choice("abc") for _ in range(5))} for i in range(60)
    ]
    (tmp_path / "z.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = sft_config(tmp_path, tiny_model_dir, tmp_path / "z.jsonl", eval_rows=5, epochs=2)

    def p_z_after_z(folder: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer("z" * 20, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        return float(probs[:, tokenizer.convert_tokens_to_ids("z")].mean())

    before = p_z_after_z(tiny_model_dir)
    summary = run_sft(config, log=lambda line: None)
    after = p_z_after_z(Path(summary["output_dir"]))
    assert before < 0.05 and after < 0.05, (before, after)
    assert not math.isnan(summary["heldout_loss_after"])


def test_missing_data_is_a_clear_error(tiny_model_dir, tmp_path):
    config = validate_config({"run": {"output_dir": str(tmp_path)}, "sft": {"base_model": str(tiny_model_dir)}})
    with pytest.raises(StageError, match=r"sft.data.path: not set; fix"):
        run_sft(config)
    config = sft_config(tmp_path, tiny_model_dir, tmp_path / "missing.jsonl")
    with pytest.raises(StageError, match="does not exist"):
        run_sft(config)


def test_cli_sft_command(tiny_model_dir, tmp_path, capsys):
    from streamrl.cli import main
    from streamrl.testing import write_config

    data = copy_task(tmp_path / "d.jsonl", rows=40)
    sections = {
        "run": {"output_dir": str(tmp_path / "run")},
        "sft": {"base_model": str(tiny_model_dir), "threads": 1, "lr": 3e-3},
        "sft.data": {"path": str(data), "eval_rows": 8},
    }
    config = write_config(tmp_path / "stages.toml", sections)
    with pytest.raises(SystemExit) as done:
        main(["sft", "--config", str(config)])
    assert done.value.code == 0 and (tmp_path / "run" / "sft" / "COMPLETE").is_file()
    assert "summary: " in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["rm", "--config", str(config)])  # [rm] has no data
    assert refused.value.code == 2
    assert "streamrl rm: rm.data.path: not set; fix" in capsys.readouterr().err


@pytest.mark.slow
def test_sft_with_lora_trains_adapters_and_writes_the_merged_model(tiny_model_dir, tmp_path):
    """``[sft.lora]``: only the adapters train (the embeddings and norms come out bit for bit the base's),
    the held-out loss falls, and the output is a plain causal LM with the adapters merged."""
    config = sft_config(tmp_path, tiny_model_dir, copy_task(tmp_path / "d.jsonl"), lr=1e-2, lora={"rank": 8})
    summary = run_sft(config, log=lambda line: None)
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] - 0.5
    lora_params = 2 * 8 * (4 * (64 + 64) + 3 * (64 + 256))  # 2 blocks, r (in + out) per projection
    assert summary["trainable_parameters"] == lora_params
    trained = AutoModelForCausalLM.from_pretrained(summary["output_dir"]).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert trained.keys() == base.keys()  # no adapter modules left
    adapted = {k for k in base if not torch.equal(trained[k], base[k])}
    assert adapted and all(k.endswith("_proj.weight") for k in adapted), adapted
    with pytest.raises(ValueError, match="set one of them"):
        sft_config(tmp_path, tiny_model_dir, tmp_path / "d.jsonl", lora={"rank": 8}, trainable_layers=1)
