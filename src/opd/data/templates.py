"""A row's prompt as its model reads it: through the chat template (with the generation prompt), or as
plain text; with a teacher's privileged context placed where its format says."""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

from opd.data.rows import Example
from opd.errors import DataError


def encode_prompt(
    example: Example,
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None = None,
    template_kwargs: dict | None = None,
) -> list[int]:
    """Token ids of a row's prompt: `render_prompt`'s text, tokenized as its template (or the plain
    tokenizer) would."""
    text, add_special_tokens = render_prompt(example, tokenizer, system_prompt, template_kwargs)
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def place_context(context_format: str, context: str, prompt: str) -> str:
    """`context_format` with {context} and {prompt} filled in one pass (neither text's braces are read)."""
    return re.sub(
        r"\{(context|prompt)\}", lambda match: context if match.group(1) == "context" else prompt, context_format
    )


def render_prompt(
    example: Example,
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None = None,
    template_kwargs: dict | None = None,
    context: str | None = None,
    context_format: str = "{context}\n\n{prompt}",
) -> tuple[str, bool]:
    """A row's prompt as text, and whether the tokenizer should add its own special tokens (BOS) to it.

    - `messages`: the chat template, with the generation prompt (and `system_prompt` first, unless
      the row has its own system message); the template writes every special token itself.
    - `question` (GSM8K): a user turn through the chat template when the tokenizer has one, else
      plain text "Question: ...\nAnswer:".
    - `prompt`: plain text, with the tokenizer's own special-token convention; no template.
    context: text only a teacher sees (a reference solution); `context_format` places it around the
    last user turn, the question or the prompt text ({context} and {prompt}).
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def with_context(text: str) -> str:
        return text if context is None else place_context(context_format, context, text)

    if example.question is not None:
        question = with_context(example.question)
        if not getattr(tokenizer, "chat_template", None):
            header = f"{system_prompt}\n\n" if system_prompt else ""
            return f"{header}Question: {question}\nAnswer:", True
        messages = [*system, {"role": "user", "content": question}]
    elif example.messages is not None:
        messages = list(example.messages)
        if context is not None:
            last_user = max(
                (index for index, message in enumerate(messages) if message["role"] == "user"), default=None
            )
            if last_user is None:
                raise DataError(f"line {example.line}: the row has teacher_context but no user turn to add it to")
            messages[last_user] = {**messages[last_user], "content": with_context(messages[last_user]["content"])}
        if system and not (messages and messages[0]["role"] == "system"):
            messages = [*system, *messages]
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"line {example.line}: row has 'messages' but the tokenizer has no chat template")
    else:
        return with_context(example.prompt), True
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
        ), False
    except Exception as exc:  # jinja raises TemplateError and others for e.g. non-alternating roles
        raise DataError(f"line {example.line}: the chat template rejected the messages ({exc})") from None
