"""Chat messages: the one place text becomes ``[{"role", "content"}]`` lists."""

from __future__ import annotations

from typing import Any

from .errors import InputError

Message = dict[str, str]


def as_messages(value: Any, role: str) -> list[Message]:
    """A string becomes one message of ``role``; a list of ``{"content", "role"?}`` dicts
    is kept (a message without a role gets ``role``). Anything else is bad input."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": m.get("role", role), "content": m["content"]} for m in value]
    raise InputError("expected a string or a list of {'role','content'} messages, "
                     f"got {type(value).__name__}")


def as_text(value: Any) -> str:
    """A string as is; messages joined by newlines (their contents only)."""
    if isinstance(value, str):
        return value
    return "\n".join(str(m["content"]) for m in as_messages(value, "user"))


def prompt_completion(prompt: Any, completion: Any) -> dict[str, list[Message]]:
    """TRL's conversational prompt/completion row: user prompt, assistant completion."""
    return {"prompt": as_messages(prompt, "user"), "completion": as_messages(completion, "assistant")}
