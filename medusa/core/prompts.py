"""Chat formatting at the edges: messages -> prompt text -> token ids, and stop ids.

The model's own chat template is used when its tokenizer has one (SmolLM2, Llama 3, Qwen2);
otherwise a FastChat conversation template (``vicuna_v1.1`` for Vicuna) formats the turns.
Stop ids are the tokenizer's EOS plus the template's own stop tokens.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


def format_prompt(tokenizer: Any, messages: Sequence[Message], template: Optional[str] = None) -> str:
    """The prompt text that asks the model for the next assistant turn."""
    return _format(tokenizer, messages, template, generation_prompt=True)


def format_conversation(tokenizer: Any, messages: Sequence[Message], template: Optional[str] = None) -> str:
    """A whole conversation as the model saw it in training (no trailing generation prompt)."""
    return _format(tokenizer, messages, template, generation_prompt=False)


def _format(tokenizer: Any, messages: Sequence[Message], template: Optional[str], generation_prompt: bool) -> str:
    if template is None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    conv = _fastchat_conversation(template or "vicuna_v1.1")
    roles = {"user": conv.roles[0], "assistant": conv.roles[1]}
    for m in messages:
        if m["role"] == "system":
            conv.set_system_message(m["content"])
        else:
            conv.append_message(roles[m["role"]], m["content"])
    if generation_prompt:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def encode_prompt(tokenizer: Any, messages: Sequence[Message], template: Optional[str] = None) -> list[int]:
    """Token ids of ``format_prompt`` (templates already contain BOS where the model wants it)."""
    return list(tokenizer.encode(format_prompt(tokenizer, messages, template), add_special_tokens=template is not None))


def stop_token_ids(tokenizer: Any, template: Optional[str] = None) -> tuple[int, ...]:
    """EOS id(s) of the tokenizer plus the template's stop tokens, deduplicated."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if template is not None:
        ids += list(_fastchat_conversation(template).stop_token_ids or [])
    return tuple(dict.fromkeys(ids))


def _fastchat_conversation(name: str) -> Any:
    from fastchat.conversation import conv_templates, get_conv_template

    if name not in conv_templates:
        raise ValueError(f"unknown conversation template {name!r} (FastChat templates, e.g. vicuna_v1.1)")
    return get_conv_template(name)
