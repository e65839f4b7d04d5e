"""The model fingerprint: equal for the same config and tokenizer (also after a save and
reload), different for a permuted vocabulary of the same size, a moved special token, or another config."""

from __future__ import annotations

from transformers import AutoConfig, AutoTokenizer

from streamrl.common.fingerprint import FINGERPRINT_HEX, config_identity, model_fingerprint, same_model
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from support import permuted_char_tokenizer


def test_same_model_same_fingerprint_also_after_a_round_trip(tmp_path):
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer)
    fp = model_fingerprint(model.config, tokenizer)
    assert len(fp) == FINGERPRINT_HEX and int(fp, 16) >= 0
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = model_fingerprint(AutoConfig.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path))
    assert again == fp
    assert model_fingerprint(model.config.to_dict(), tokenizer) == fp  # a plain dict works too


def test_a_permuted_vocabulary_of_the_same_shape_differs():
    tokenizer, permuted = build_char_tokenizer(), permuted_char_tokenizer()
    assert len(permuted) == len(tokenizer) and permuted.eos_token_id == tokenizer.eos_token_id
    assert permuted("abc")["input_ids"] != tokenizer("abc")["input_ids"]  # really another mapping
    config = build_tiny_model(tokenizer).config
    assert model_fingerprint(config, permuted) != model_fingerprint(config, tokenizer)
    assert model_fingerprint(config, permuted) == model_fingerprint(config, permuted_char_tokenizer())


def test_config_changes_that_change_the_function_differ_and_bookkeeping_does_not():
    tokenizer = build_char_tokenizer()
    config = build_tiny_model(tokenizer).config.to_dict()
    fp = model_fingerprint(config, tokenizer)
    assert model_fingerprint({**config, "rope_theta": 1.0}, tokenizer) != fp
    assert model_fingerprint({**config, "eos_token_id": 2}, tokenizer) != fp
    bookkeeping = {
        **config,
        "_name_or_path": "/elsewhere",
        "transformers_version": "0.0",
        "torch_dtype": "bfloat16",
        "use_cache": False,
    }
    assert model_fingerprint(bookkeeping, tokenizer) == fp
    assert "_name_or_path" not in config_identity(bookkeeping)


def test_an_unstated_fingerprint_is_not_compared():
    assert same_model("abc", "abc") and same_model("", "abc") and same_model("abc", "")
    assert not same_model("abc", "abd")
