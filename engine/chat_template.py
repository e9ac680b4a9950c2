"""A model's chat template: Jinja2 rendered in a sandbox, the way transformers renders it.

Templates come from the model directory (tokenizer_config.json, chat_template.jinja or
chat_template.json), i.e. from whoever published the model, so they run in Jinja's
immutable sandbox; messages come from users, so they are validated first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenfleet.engine.errors import ModelLoadError, ValidationError

__all__ = ["ChatTemplate", "load_chat_template_source", "validate_messages"]


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant mask): render as is."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension API declares it so

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' (and so the templates) do not.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check OpenAI-style chat messages: a non-empty list of {role, content} string dicts."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise ValidationError("messages must be a non-empty list of {role, content} objects")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValidationError(f"messages[{index}] must be an object with role and content")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValidationError(f"messages[{index}].{key} must be a string")
        for key, value in message.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValidationError(f"messages[{index}].{key} must be a string")
        checked.append(dict(message))
    return checked


def load_chat_template_source(model_dir: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The template text: tokenizer_config.json's, else chat_template.jinja / .json; or None."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {item.get("name"): item.get("template") for item in template}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = model_dir / "chat_template.json"
    if json_file.is_file():
        try:
            value = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as exc:
            raise ModelLoadError(f"{json_file} is not valid JSON with a chat_template") from exc
        return value if isinstance(value, str) else None
    return None


class ChatTemplate:
    """A compiled chat template plus the special-token strings templates may reference."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ModelLoadError(f"the model's chat template does not compile: {exc}") from exc
        self.source = source
        self._special_tokens = dict(special_tokens)

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        """Render validated `messages`; template errors become ValidationError."""
        checked = validate_messages(messages)
        try:
            return self._template.render(
                messages=checked,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, LookupError) as exc:
            # raise_exception() in templates reports bad conversations (e.g. roles that do not
            # alternate); the sandbox reports unsafe access; other errors are templates that
            # cannot handle these messages. A request must never take the worker down.
            raise ValidationError(f"chat template rejected the messages: {exc}") from exc
