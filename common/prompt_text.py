"""A prompt as the model reads it: rendered with the tokenizer's chat template, or as it is.

:func:`format_prompt` gives the generation prompt of a :class:`~streamrl.common.prompts.Prompt`
(its text, or its chat, with the generation prompt added); :func:`conversation_text` gives a
whole chat as training text (PPO-ptx).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamrl.common.prompts import Prompt

log = logging.getLogger(__name__)

_warned_no_template = False


def format_prompt(
    text: str, tokenizer: Any, *, chat_template: bool, system: str | None = None, messages: Sequence[dict] | None = None
) -> str:
    """Turn a prompt into the string given to the model.

    Args:
        text: raw prompt text (unused when ``messages`` is given).
        tokenizer: a ``transformers`` tokenizer (only used with a chat template or ``messages``).
        chat_template: if True and ``tokenizer.chat_template`` is set, render
            ``[{"role": "system", "content": system}?, {"role": "user",
            "content": text}]`` with ``apply_chat_template(...,
            tokenize=False, add_generation_prompt=True)``.
        system: optional system message (with a chat template; with ``messages``, added
            first when they hold no system message).
        messages: the prompt as a chat (:attr:`Prompt.messages`): always rendered with the
            tokenizer's chat template and the generation prompt, whatever ``chat_template`` says.

    Returns:
        The formatted prompt string; ``text`` unchanged when no template is
        used (``chat_template`` False, or the tokenizer has none, in which
        case ``system`` is ignored).

    Raises:
        ValueError: ``messages`` given but the tokenizer has no chat template.
    """
    if messages is not None:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the prompts are chat messages (prompts.messages_field) but the tokenizer of "
                "model.path has no chat template to render them; fix: use a chat model (one whose "
                "tokenizer_config.json has a chat_template) or give the prompts as text (text_field)"
            )
        chat = list(messages)
        if system is not None and not any(m.get("role") == "system" for m in chat):
            chat.insert(0, {"role": "system", "content": system})
        return str(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    if not chat_template:
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        global _warned_no_template
        if not _warned_no_template:
            log.warning("chat_template requested but the tokenizer has none; using raw prompt text")
            _warned_no_template = True
        return text
    chat = []
    if system is not None:
        chat.append({"role": "system", "content": system})
    chat.append({"role": "user", "content": text})
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return str(rendered)


def conversation_text(prompt: Prompt, tokenizer: Any) -> str:
    """A prompt as training text (PPO-ptx): its text, or its whole chat rendered with the chat
    template (no generation prompt: the conversation is complete).

    Raises:
        ValueError: a chat prompt and a tokenizer without a chat template.
    """
    if prompt.messages is None:
        return prompt.text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "learner.ptx_data holds chat messages but the tokenizer of model.path has no chat template; "
            "fix: use a chat model or give the data as text (text_field)"
        )
    return str(tokenizer.apply_chat_template(list(prompt.messages), tokenize=False))
