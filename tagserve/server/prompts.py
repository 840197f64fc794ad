"""Request bodies -> engine prompts: the completion `input` forms and chat `messages`."""

from __future__ import annotations

from typing import Any

from tagserve.engine.async_engine import AsyncEngine
from tagserve.engine.inputs import Prompt, normalize_prompts
from tagserve.errors import ValidationError
from tagserve.server.errors import RequestTooLargeError
from tagserve.server.protocol import ChatFields, ChatMessage


def completion_prompts(input: str | list[Any], max_inputs: int) -> list[Prompt]:
    """`input` as one prompt per text or token-id list (a bare `list[int]` is one prompt)."""
    prompts = normalize_prompts(input)
    if not prompts:
        raise ValidationError("You must pass at least one prompt")
    if len(prompts) > max_inputs:
        raise RequestTooLargeError(f"This request has {len(prompts)} inputs; the server accepts "
                                   f"at most {max_inputs} per request (--max-inputs-per-request).")
    return prompts


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it; text parts are joined into one string."""
    data = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
        parts = message.content
        if any(p.type != "text" or p.text is None for p in parts):
            raise ValidationError("Only text content parts are supported",
                                  parameter="messages")
        data["content"] = "\n".join(p.text for p in parts)
    return data


async def render_chat(engine: AsyncEngine, chat: ChatFields) -> str:
    """The conversation rendered with the tokenizer's chat template (in the thread pool)."""
    if chat.chat_template is not None:
        raise ValidationError("Chat template is passed with request, but "
                              "--trust-request-chat-template is not set. Refused request with "
                              "untrusted chat template.", parameter="chat_template")
    if engine.tokenizer is None:
        raise ValidationError("This server runs without a tokenizer; send token ids instead.")
    messages = [_template_message(m) for m in chat.messages]

    def render() -> str:
        return engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=chat.add_generation_prompt,
            continue_final_message=chat.continue_final_message,
            **(chat.chat_template_kwargs or {}))

    return await engine.run_in_pool(render)
