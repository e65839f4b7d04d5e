"""common/lora.py and ``[learner.lora]``: the config's rules, the adapter's wire names and
announcement, and the generators' merge ``W = W0 + (alpha / r) B A`` (from the base, every version)
against hand computation and against PEFT's own ``merge_and_unload``."""

from __future__ import annotations

import copy

import pytest
import torch

from streamrl.cli import main
from streamrl.common.config import ConfigError, LoraSection, load_config
from streamrl.common.lora import (
    AdapterMerger,
    adapted_layers,
    adapter_spec,
    adapter_tensors,
    apply_lora,
    is_lora,
    wire_state,
)
from streamrl.common.messages import AdapterSpec, WeightsAnnounce, decode, encode
from streamrl.common.models import build_char_tokenizer, build_tiny_model, save_tiny_model
from streamrl.common.modes import WeightDtype
from streamrl.common.weights import blob_layout, pack_state_dict, unpack_state_dict

TOKENIZER = build_char_tokenizer()


def randomise_adapter(model, seed: int, scale: float = 0.05) -> None:
    """Give every LoRA A and B random values (B starts at 0: a fresh adapter is the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_defaults_target_every_llama_linear_layer_and_dropout_is_refused(tmp_path, capsys):
    section = LoraSection()
    assert section.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert section.scaling == section.alpha / section.rank == 2.0
    assert load_config(None).learner.lora is None  # off unless asked for
    path = tmp_path / "job.toml"
    path.write_text("[learner.lora]\nrank = 8\ndropout = 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = next(x for x in str(info.value).splitlines() if "learner.lora.dropout" in x)
    assert "fix: set dropout = 0" in line and "generators merge" in line
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--config", str(path)])
    assert exit_info.value.code == 2
    assert "learner.lora.dropout" in capsys.readouterr().err


def test_adapter_names_follow_the_base_model_and_only_adapters_train():
    model = build_tiny_model(TOKENIZER, seed=0)
    base_names = set(model.state_dict())
    lora = apply_lora(model, LoraSection(rank=4, alpha=8.0, target_modules=["q_proj", "down_proj"]))
    assert is_lora(lora) and not is_lora(lora.get_base_model())
    tensors = adapter_tensors(lora)
    layers = adapted_layers(tensors)
    assert set(layers) == {
        f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")
    }
    assert set(layers) <= base_names  # the generator finds each adapted layer in its own base
    for name, (a, b) in layers.items():
        out_features, in_features = dict(model.named_parameters())[name.replace(".weight", ".base_layer.weight")].shape
        assert a.shape == (4, in_features) and b.shape == (out_features, 4)
        assert not b.any()  # B starts at 0
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert wire_state(lora).keys() == tensors.keys()
    assert adapter_spec(lora) == AdapterSpec(rank=4, alpha=8.0, target_modules=["down_proj", "q_proj"])


def test_malformed_adapters_are_refused():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="only"):
        adapted_layers({"x.lora_A.weight": a})
    with pytest.raises(ValueError, match="do not chain"):
        adapted_layers({"x.lora_A.weight": a, "x.lora_B.weight": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match="not a LoRA adapter weight"):
        adapted_layers({"x.weight": a})


def test_merge_is_w0_plus_scaled_b_a_from_the_base_every_version(tmp_path):
    folder = save_tiny_model(tmp_path / "base", seed=0)
    name = "model.layers.1.mlp.up_proj.weight"
    merger = AdapterMerger(folder)
    w0 = merger.base_weights({name})[name].clone()
    spec = AdapterSpec(rank=2, alpha=6.0, target_modules=["up_proj"])
    a = torch.tensor([[1.0] * w0.shape[1], [0.5] * w0.shape[1]])
    b = torch.zeros(w0.shape[0], 2)
    b[0, 0], b[3, 1] = 2.0, -1.0
    for _ in range(2):  # the same version twice: no accumulation
        merged = merger.merge(
            {"model.layers.1.mlp.up_proj.lora_A.weight": a, name.replace("weight", "lora_B.weight"): b}, spec
        )
        want = w0.clone()
        want[0] += 3.0 * 2.0 * 1.0  # scaling 6 / 2 = 3, (B A)[0, :] = 2 * 1
        want[3] += 3.0 * -1.0 * 0.5  # (B A)[3, :] = -1 * 0.5
        assert torch.equal(merged[name], want)
    zero = merger.merge(
        {name.replace("weight", "lora_A.weight"): a, name.replace("weight", "lora_B.weight"): b * 0}, spec
    )
    assert torch.equal(zero[name], w0)  # back to the base exactly after a merged version
    with pytest.raises(RuntimeError, match="does not fit"):
        merger.merge(
            {"model.layers.9.mlp.up_proj.lora_A.weight": a, "model.layers.9.mlp.up_proj.lora_B.weight": b}, spec
        )
    with pytest.raises(RuntimeError, match="does not fit"):
        merger.merge(
            {name.replace("weight", "lora_A.weight"): a[:, :3], name.replace("weight", "lora_B.weight"): b}, spec
        )


def test_merge_equals_pefts_merge_and_unload(tmp_path):
    folder = save_tiny_model(tmp_path / "base", seed=0)
    model = build_tiny_model(TOKENIZER, seed=0)
    lora = apply_lora(model, LoraSection(rank=4, alpha=8.0))
    randomise_adapter(lora, seed=1)
    merged = AdapterMerger(folder).merge(adapter_tensors(lora), adapter_spec(lora))
    reference = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert len(merged) == 14  # 7 layers x 2 blocks
    for name, weight in merged.items():
        torch.testing.assert_close(weight, reference[name], rtol=0, atol=1e-6)  # same float32 ops, summed in order


def test_adapter_blob_and_announcement_round_trip():
    lora = apply_lora(build_tiny_model(TOKENIZER, seed=0), LoraSection(rank=4, alpha=8.0))
    randomise_adapter(lora, seed=2)
    tensors = adapter_tensors(lora)
    packed = pack_state_dict(tensors, version=3, dtype=WeightDtype.FLOAT32, chunk_bytes=4096, sender="l")
    packed.announce.adapter = adapter_spec(lora)
    packed.announce.model_fingerprint = "0123456789abcdef"
    frames = encode(packed.announce)
    announce = decode([bytes(f) for f in frames], expected=[WeightsAnnounce])
    assert announce.adapter == adapter_spec(lora) and announce.adapter.scaling == 2.0
    assert announce.model_fingerprint == "0123456789abcdef"
    got = unpack_state_dict(announce, packed.blob)
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    full = sum(t.numel() * 4 for t in build_tiny_model(TOKENIZER, seed=0).state_dict().values())
    assert announce.total_bytes < full / 4  # only the adapter travels


@pytest.mark.slow
def test_the_default_adapter_of_the_default_job_is_under_one_percent_of_its_bytes():
    """SmolLM2-135M (the default job's ``model.path``), ``[learner.lora]`` defaults, float32 wire: 4,884,480
    adapter bytes per version against 538,060,032 for the whole model (0.91%)."""
    from streamrl.common.models import load_causal_lm, resolve_model_path

    model = load_causal_lm(resolve_model_path("smollm2-135m-instruct"), device=torch.device("cpu"))
    _, full = blob_layout(model.state_dict(), WeightDtype.FLOAT32)
    _, adapter = blob_layout(adapter_tensors(apply_lora(model, LoraSection())), WeightDtype.FLOAT32)
    assert adapter <= full / 100, (adapter, full)
    assert adapter == 4 * LoraSection().rank * 30 * (2 * 1152 + 2 * 768 + 3 * 2112)  # 30 blocks, r (in + out)
