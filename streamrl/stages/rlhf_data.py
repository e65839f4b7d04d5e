"""Demonstrations and preference data for ``streamrl sft`` and ``streamrl rm``.

Files: JSON lines (``.jsonl``, ``.json``, optionally gzip-compressed ``.gz``) or Parquet
(``.parquet``, read with pyarrow). Each row is one prompt and one or more responses; the
layout is recognised from the keys of the row:

===========================================  ==============================================
keys                                         meaning
===========================================  ==============================================
``prompt``, ``response``                     a demonstration (SFT only)
``messages``                                 a chat ``[{"role", "content"}, ...]`` ending with
                                             an assistant turn: the demonstration (SFT only)
``prompt``, ``chosen``, ``rejected``         a preference pair
``chosen``, ``rejected`` (no ``prompt``)     Anthropic hh-rlhf: two whole dialogues
                                             (``\\n\\nHuman: ...\\n\\nAssistant: ...``) that share
                                             everything up to the last ``Assistant:`` turn
``prompt``, ``responses``                    K >= 2 responses ranked best first (InstructGPT's
                                             K-wise comparisons)
===========================================  ==============================================

Every row becomes an :class:`Example`: the context (chat messages) and the responses
best first. For SFT the demonstration is the best response (the chosen one of a pair:
for hh-rlhf the demonstrations are the chosen responses). The SFT loss covers the final
assistant turn only.

How a prompt is rendered (:func:`render_prompt`) is shared by both stages and matches
the generators: with ``chat_template`` the context goes through the tokenizer's chat
template with the generation prompt appended; without it, the prompt is the text as it
stands in the file (an hh-rlhf prefix ends with ``"\\n\\nAssistant:"`` and its responses
start with a space). The held-out split (:func:`split_examples`) hashes the rendered-free
prompt text with a seed, so ``sft`` and ``rm`` given the same file, seed and size hold
out the same prompts, and a prompt is never on both sides.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamrl.common.prompts import json_lines

__all__ = [
    "Example",
    "load_examples",
    "parse_dialogue",
    "parse_row",
    "read_rows",
    "render_prompt",
    "response_text",
    "split_examples",
    "split_proxy_gold",
]

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass(frozen=True)
class Example:
    """One prompt with its responses.

    Attributes:
        messages: the context as chat messages (``role`` user/assistant/system), ending
            with a user turn.
        text: the prompt as plain text (how it is fed without a chat template).
        responses: one response (a demonstration) or K >= 2 ranked best first; plain
            text as it follows ``text`` (hh-rlhf responses keep their leading space).
        row: 1-based row number in the file (for error messages).
    """

    messages: tuple[dict, ...]
    text: str
    responses: tuple[str, ...]
    row: int

    @property
    def demonstration(self) -> str:
        """The best response: what SFT imitates."""
        return self.responses[0]


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a ``.jsonl``/``.json`` (optionally ``.gz``) or ``.parquet`` file as dicts.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown extension, invalid JSON on a line (with its number), a
            line that is not an object, or pyarrow missing for Parquet.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow; fix: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    compressed = bool(suffixes) and suffixes[-1] == ".gz"
    inner = suffixes[-2] if compressed and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if inner not in (".jsonl", ".json"):
        raise ValueError(f"{path}: unknown data format; expected .jsonl, .json, .jsonl.gz or .parquet")
    return [row for _, row in json_lines(path)]


def _turns(context: str) -> list[dict]:
    """``"\\n\\nHuman: q\\n\\nAssistant: a..."`` -> chat messages (contents stripped)."""
    if not context.startswith(HUMAN):
        raise ValueError("dialogue does not start with '\\n\\nHuman:'")
    messages = []
    position = 0
    while position < len(context):
        role, marker = ("user", HUMAN) if context.startswith(HUMAN, position) else ("assistant", ASSISTANT)
        start = position + len(marker)
        following = [i for i in (context.find(HUMAN, start), context.find(ASSISTANT, start)) if i >= 0]
        position = min(following) if following else len(context)
        messages.append({"role": role, "content": context[start:position].strip()})
    return messages


def parse_dialogue(chosen: str, rejected: str | None = None) -> tuple[list[dict], str, list[str]]:
    """Split hh-rlhf dialogues into their shared context and the final responses.

    Args:
        chosen: ``"\\n\\nHuman: q1\\n\\nAssistant: a1\\n\\nHuman: q2\\n\\nAssistant: a2"``.
        rejected: the other dialogue of a pair, or None.

    The prompt is the longest common prefix of the dialogues cut right after its last
    ``"\\n\\nAssistant:"`` (a lone dialogue: after its last one), as TRL's prompt
    extraction does; this also copes with the few hh-rlhf pairs whose dialogues differ
    before the last turn (a malformed turn marker), whose responses then hold the rest.

    Returns:
        ``(messages, prompt_text, responses)``: ``messages`` are the turns of the prompt
        (``[user q1, assistant a1, user q2]``, contents stripped), ``prompt_text`` ends with
        ``"\\n\\nAssistant:"``, ``responses`` are the rests (``[" a2", ...]``, leading space
        kept), one per dialogue.

    Raises:
        ValueError: no common ``Assistant:`` turn, or a context that does not start with a
            Human turn.
    """
    shared = chosen if rejected is None else os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(
            "the dialogues share no '\\n\\nAssistant:' turn"
            if rejected is not None
            else "dialogue has no '\\n\\nAssistant:' turn"
        )
    end = cut + len(ASSISTANT)
    texts = [chosen] if rejected is None else [chosen, rejected]
    return _turns(chosen[:cut]), chosen[:end], [t[end:] for t in texts]


def _plain_text(messages: Sequence[dict]) -> str:
    """Chat messages as plain text: a lone user turn as it is, longer chats in the hh-rlhf
    layout (system text first, then ``Human:``/``Assistant:`` turns, ending with ``Assistant:``)."""
    if len(messages) == 1:
        return messages[0]["content"]
    parts = [m["content"] for m in messages if m["role"] == "system"]
    parts += [
        f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}" for m in messages if m["role"] != "system"
    ]
    return "".join(parts) + ASSISTANT


def _string(row: dict, key: str, where: str, *, empty: bool = False) -> str:
    """``row[key]`` as a string; an empty (or blank) one only with ``empty`` (a response may
    be empty: hh-rlhf prefers a few empty answers to harmful ones)."""
    value = row[key]
    if not isinstance(value, str) or not (empty or value.strip()):
        raise ValueError(f"{where}: {key!r} must be a {'' if empty else 'non-empty '}string, got {value!r:.80}")
    return value


def _user_prompt(row: dict, where: str) -> tuple[tuple[dict, ...], str]:
    text = _string(row, "prompt", where)
    return ({"role": "user", "content": text},), text


def parse_row(row: dict, *, row_number: int, source: str = "<data>") -> Example:
    """One data row as an :class:`Example` (layouts in the module docstring).

    Raises:
        ValueError: a row matching no layout, or a malformed field (the message names the
            file, row and key).
    """
    where = f"{source} row {row_number}"
    keys = set(row)
    if "messages" in keys:
        messages = row["messages"]
        if (
            not isinstance(messages, list)
            or len(messages) < 2
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant")
                for m in messages
            )
        ):
            raise ValueError(
                f"{where}: 'messages' must be a list of at least two {{role, content}} with roles system/user/assistant"
            )
        if messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
            raise ValueError(f"{where}: 'messages' must end with a user turn then the assistant's response")
        context = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
        return Example(context, _plain_text(context), (messages[-1]["content"],), row_number)
    if {"chosen", "rejected"} <= keys:
        chosen, rejected = _string(row, "chosen", where, empty=True), _string(row, "rejected", where, empty=True)
        if "prompt" in keys:
            context, text = _user_prompt(row, where)
            return Example(context, text, (chosen, rejected), row_number)
        try:
            messages, text, responses = parse_dialogue(chosen, rejected)
        except ValueError as exc:
            raise ValueError(
                f"{where}: without a 'prompt' key, 'chosen' and 'rejected' must be hh-rlhf dialogues: {exc}"
            ) from None
        return Example(tuple(messages), text, tuple(responses), row_number)
    if {"prompt", "responses"} <= keys:
        responses = row["responses"]
        if (
            not isinstance(responses, (list, tuple))
            or len(responses) < 2
            or not all(isinstance(r, str) for r in responses)
        ):
            raise ValueError(f"{where}: 'responses' must list at least two strings, best first")
        context, text = _user_prompt(row, where)
        return Example(context, text, tuple(responses), row_number)
    if {"prompt", "response"} <= keys:
        context, text = _user_prompt(row, where)
        return Example(context, text, (_string(row, "response", where, empty=True),), row_number)
    raise ValueError(
        f"{where}: keys {sorted(keys)} match no layout; expected prompt+response, messages, "
        "prompt+chosen+rejected, chosen+rejected (hh-rlhf dialogues) or prompt+responses"
    )


def load_examples(path: str | Path) -> list[Example]:
    """Every row of ``path`` as an :class:`Example` (see :func:`read_rows`, :func:`parse_row`).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_rows` and :func:`parse_row`; also an
            empty file.
    """
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return [parse_row(row, row_number=i, source=str(path)) for i, row in enumerate(rows, start=1)]


def _prompt_hash(example: Example, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{example.text}".encode()).hexdigest()


def split_examples(
    examples: Sequence[Example], *, eval_rows: int, seed: int, train_rows: int | None = None
) -> tuple[list[Example], list[Example]]:
    """Hold out ``eval_rows`` examples chosen by a seeded hash of their prompt text.

    The examples are ordered by ``sha256(seed, prompt text)``; the first ``eval_rows``
    (plus any later example with a prompt already held out, so a prompt is never on both
    sides) are held out, and training uses the next ``train_rows`` (all the others when
    None). The result depends on the file's contents and the seed only, not on row order
    or the process, so two stages given the same file and settings agree.

    Returns:
        ``(train, held_out)``, each in file order.

    Raises:
        ValueError: ``eval_rows`` negative or leaving no training example.
    """
    if eval_rows < 0 or eval_rows >= len(examples):
        raise ValueError(
            f"eval_rows = {eval_rows} must be >= 0 and leave training rows (the data has "
            f"{len(examples)}); fix: lower eval_rows"
        )
    ranked = sorted(range(len(examples)), key=lambda i: _prompt_hash(examples[i], seed))
    held_prompts = {examples[i].text for i in ranked[:eval_rows]}
    rest = [i for i in ranked if examples[i].text not in held_prompts]
    if not rest:
        raise ValueError("every prompt landed in the held-out split; fix: lower eval_rows")
    chosen = set(rest[:train_rows] if train_rows is not None else rest)
    held = [e for e in examples if e.text in held_prompts]
    train = [e for i, e in enumerate(examples) if i in chosen]
    return train, held


def split_proxy_gold(examples: Sequence[Example], *, seed: int) -> tuple[list[Example], list[Example]]:
    """Split training examples into two halves, disjoint by prompt: the *proxy* reward model's
    and the *gold* one's (Gao et al. 2022, "Scaling laws for reward model overoptimization").

    The distinct prompts are ordered by ``sha256(seed, "proxy-gold", prompt text)`` (a hash
    independent of the held-out split's); the first ``ceil(P / 2)`` of the P prompts go to the
    proxy, the rest to the gold model, and every example follows its prompt. Deterministic
    (file contents and seed only, not row order or the process).

    Returns:
        ``(proxy, gold)``, each in input order; both non-empty when there are >= 2 prompts.

    Raises:
        ValueError: fewer than two distinct prompts (one half would be empty).
    """
    prompts = sorted(
        {e.text for e in examples}, key=lambda t: hashlib.sha256(f"{seed}\x00proxy-gold\x00{t}".encode()).hexdigest()
    )
    if len(prompts) < 2:
        raise ValueError(
            f"{len(prompts)} distinct training prompt(s) cannot be split into a proxy and a gold "
            "half; fix: train on more rows (raise rm.data.train_rows) or set rm.gold = false"
        )
    proxy_prompts = set(prompts[: (len(prompts) + 1) // 2])
    return ([e for e in examples if e.text in proxy_prompts], [e for e in examples if e.text not in proxy_prompts])


def render_prompt(example: Example, tokenizer: Any, *, chat_template: bool, system_prompt: str | None) -> str:
    """The prompt string the policy and the reward model see for ``example``.

    With ``chat_template`` the messages (after an optional system message) go through
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` (for a one-turn
    prompt this is exactly what the generators render); otherwise the plain
    ``example.text``.

    Raises:
        ValueError: ``chat_template`` requested but the tokenizer has none.
    """
    if not chat_template:
        return example.text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat_template is on but the tokenizer has no chat template; fix: set model.chat_template = false"
        )
    messages = list(example.messages)
    if system_prompt is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def response_text(response: str, *, chat_template: bool) -> str:
    """A response as it follows its rendered prompt: stripped of surrounding whitespace
    under a chat template (the template already ends with the assistant header's newline),
    unchanged otherwise."""
    return response.strip() if chat_template else response
