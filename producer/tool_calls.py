"""OpenAI function calling (`tools`, `tool_choice`) on top of grammars, the way TGI does it.

The model is shown the tools (TGI's `tool_prompt` and the tools' JSON, appended to the last
user message: the gateway holds no chat template to render them natively) and its output is
constrained to one JSON object `{"name": <a tool>, "arguments": <that tool's parameters>}`.
With `tool_choice: "auto"` one more choice is allowed, `no_tool`, whose `content` becomes an
ordinary assistant message. The answer is then turned back into OpenAI's `tool_calls`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from tokenfleet.producer.errors import ValidationError

__all__ = ["DEFAULT_TOOL_PROMPT", "NO_TOOL", "ToolCallPlan", "ToolCallStream", "call_prefix"]

# TGI's default `tool_prompt`.
DEFAULT_TOOL_PROMPT: Final = (
    "Given the functions available, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt. Respond in the format {name: "
    "function name, arguments: dictionary of argument name and its value}. Do not use "
    "variables.")
NO_TOOL: Final = "no_tool"
MAX_TOOLS_CHARS: Final = 60 * 1024  # under the 64 KiB grammar limit, with room for the wrapper
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_CALL_PREFIX: Final = re.compile(r'\{"name": "([A-Za-z0-9_-]{1,64})", "arguments": ')
_NO_TOOL_SCHEMA: Final = {
    "type": "object",
    "properties": {"content": {"type": "string",
                               "description": "The answer, when no function fits."}},
    "required": ["content"],
}


@dataclass(frozen=True)
class ToolCallPlan:
    """What a chat request with tools becomes: a grammar, a prompt, and a reading of the
    answer."""

    tools: list[dict[str, Any]]  # [{"name", "description", "parameters"}], the allowed ones
    allow_no_tool: bool  # tool_choice "auto": the model may answer in words
    named: bool = False  # tool_choice named one function

    @classmethod
    def build(cls, tools: list[Any] | None, tool_choice: Any) -> ToolCallPlan | None:
        """None when the request does not call tools (no tools, or tool_choice "none")."""
        if not tools or tool_choice == "none":
            return None
        functions = [_function(t) for t in tools]
        names = [f["name"] for f in functions]
        if len(set(names)) != len(names):
            raise _invalid("tool names must be unique")
        if NO_TOOL in names:
            raise _invalid(f"{NO_TOOL!r} is a reserved tool name")
        if tool_choice in (None, "auto"):
            return cls(functions, allow_no_tool=True)
        if tool_choice == "required":
            return cls(functions, allow_no_tool=False)
        name = _chosen_name(tool_choice)
        if name not in names:
            raise _invalid(f"`tool_choice` names {name!r}, which is not in `tools`")
        return cls([f for f in functions if f["name"] == name], allow_no_tool=False, named=True)

    def grammar(self) -> dict[str, Any]:
        """TGI's `grammar`: one JSON object naming a tool and carrying its arguments.

        A tool's local `$ref`s (Pydantic puts nested models and enums in `$defs`) point into
        its own schema; inside the combined one they would point at the wrong root, so each
        tool's definitions move to the root's `$defs` under the tool's prefix."""
        choices = []
        definitions: dict[str, Any] = {}
        for i, f in enumerate(self.tools):
            arguments, defs = _embedded(f["parameters"], f"tool{i}")
            choices.append(_call_schema(f["name"], arguments))
            definitions.update(defs)
        if self.allow_no_tool:
            choices.append(_call_schema(NO_TOOL, _NO_TOOL_SCHEMA))
        schema: dict[str, Any] = choices[0] if len(choices) == 1 else {"anyOf": choices}
        if definitions:
            schema = {**schema, "$defs": definitions}
        grammar = {"type": "json", "value": schema}
        if len(json.dumps(schema)) > MAX_TOOLS_CHARS:
            raise _invalid(f"the `tools` (their schemas) are larger than {MAX_TOOLS_CHARS} "
                           "characters")
        return grammar

    def prompt(self, tool_prompt: str | None) -> str:
        shown = [{"type": "function", "function": f} for f in self.tools]
        return f"{tool_prompt or DEFAULT_TOOL_PROMPT}\n{json.dumps(shown)}"

    def message(self, generated_text: str, call_id: str) -> tuple[dict[str, Any], bool]:
        """The assistant message for the model's answer, and whether it calls a tool.

        An answer cut short (max_tokens) is not valid JSON: it comes back as plain content,
        and the finish reason says `length`."""
        try:
            call = json.loads(generated_text)
            name, arguments = call["name"], call["arguments"]
        except (ValueError, TypeError, KeyError):
            return {"role": "assistant", "content": generated_text}, False
        if name == NO_TOOL:
            content = arguments.get("content") if isinstance(arguments, dict) else None
            return {"role": "assistant", "content": str(content or "")}, False
        # The arguments exactly as generated (what a stream sent, piece by piece).
        prefix = call_prefix(generated_text)
        raw = (generated_text[prefix[1]:-1] if prefix is not None
               and generated_text.endswith("}") else json.dumps(arguments))
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": name, "arguments": raw}}]}, True


class ToolCallStream:
    """A tool call streamed as OpenAI does: once the generated text has named the function,
    one `tool_calls` delta with the id and name, then the arguments' text as it grows. The
    grammar fixes the text's shape (`{"name": "<f>", "arguments": <object>}`, no free
    whitespace), so the arguments are a slice of it; the last character is held back until
    the end, since it may be the wrapper's closing brace. `no_tool` answers are not
    streamed (their content is a JSON string: sent whole at the end)."""

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self.text = ""
        self.started = False
        self._sent = 0  # characters of `text` sent (the prefix counts as sent)

    def push(self, piece: str) -> list[dict[str, Any]]:
        """The `tool_calls` entries to send after `piece` of generated text (0 or 1)."""
        self.text += piece
        entry: dict[str, Any] = {"index": 0, "function": {"arguments": ""}}
        if not self.started:
            prefix = call_prefix(self.text)
            if prefix is None or prefix[0] == NO_TOOL:
                return []
            self.started, self._sent = True, prefix[1]
            entry.update(id=self.call_id, type="function")
            entry["function"]["name"] = prefix[0]
        entry["function"]["arguments"] = self.text[self._sent:-1]
        self._sent = max(self._sent, len(self.text) - 1)
        return [entry] if "id" in entry or entry["function"]["arguments"] else []

    def finish(self, complete: bool) -> list[dict[str, Any]]:
        """What is left of the arguments when the answer ends (`complete`: the grammar
        completed, so the last character is the wrapper's brace; else it was cut short)."""
        if not self.started:
            return []
        end = len(self.text) - 1 if complete and self.text.endswith("}") else len(self.text)
        rest, self._sent = self.text[self._sent:end], end
        return [{"index": 0, "function": {"arguments": rest}}] if rest else []


def call_prefix(text: str) -> tuple[str, int] | None:
    """(function name, where its arguments start) once `text` has got that far."""
    match = _CALL_PREFIX.match(text)
    return (match.group(1), match.end()) if match else None


def _function(tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise _invalid("every tool must be {\"type\": \"function\", \"function\": {...}}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise _invalid("a tool needs a `function` object")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _invalid(f"a function name must be 1-64 of [A-Za-z0-9_-], got {name!r}")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise _invalid(f"the parameters of {name!r} must be a JSON schema object")
    out = {"name": name, "parameters": parameters}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    return out


def _chosen_name(tool_choice: Any) -> str:
    if isinstance(tool_choice, str):  # TGI's client sends the function's name alone
        return tool_choice
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    raise _invalid("`tool_choice` must be \"none\", \"auto\", \"required\", a function "
                   "name or {\"type\": \"function\", \"function\": {\"name\": ...}}")


def _embedded(parameters: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema to put under `arguments`, definitions for the root `$defs`). Without a
    local `$ref` the tool's schema goes in as it is."""
    if '"$ref"' not in json.dumps(parameters):
        return parameters, {}
    body = {k: v for k, v in parameters.items() if k not in ("$defs", "definitions")}
    defs = {prefix: _rewrite(body, prefix)}
    for container in ("definitions", "$defs"):
        for name, schema in (parameters.get(container) or {}).items():
            defs[f"{prefix}.{name}"] = _rewrite(schema, prefix)
    return {"$ref": f"#/$defs/{_escape(prefix)}"}, defs


def _rewrite(node: Any, prefix: str) -> Any:
    if isinstance(node, list):
        return [_rewrite(v, prefix) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rewrite(v, prefix) for k, v in node.items()}
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = _rewrite_ref(ref[1:], prefix)
    return out


def _rewrite_ref(pointer: str, prefix: str) -> str:
    """A JSON pointer into the tool's schema -> the same place in the root's `$defs`."""
    for container in ("/$defs/", "/definitions/"):
        if pointer.startswith(container):
            name, slash, rest = pointer[len(container):].partition("/")
            key = f"{prefix}.{_unescape(name)}"
            return f"#/$defs/{_escape(key)}{slash}{rest}"
    return f"#/$defs/{_escape(prefix)}{pointer}"


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def _invalid(what: str) -> ValidationError:
    return ValidationError(f"Input validation error: {what}")
