"""A request's output constraint: TGI's `grammar` parameter (JSON schema or regex).

TGI's shapes: `{"type": "json", "value": <schema object, or the schema as a JSON string>}`,
`{"type": "regex", "value": "<pattern>"}`, and `{"type": "json_schema", "value": {"name": ...,
"schema": <schema>}}` (TGI 3's spelling of OpenAI's `response_format`). The grammar is checked
for shape here; whether the schema or pattern compiles is decided by `GrammarCompiler`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from tokenfleet.engine.errors import ValidationError

__all__ = ["GRAMMAR_TYPES", "MAX_GRAMMAR_CHARS", "Grammar"]

GRAMMAR_TYPES = ("json", "regex", "json_schema")
# A schema this large is a mistake or an attack: compiling it would stall the engine thread.
MAX_GRAMMAR_CHARS = 64 * 1024


@dataclass(frozen=True)
class Grammar:
    type: str
    value: Any

    @classmethod
    def coerce(cls, grammar: Grammar | dict[str, Any] | None) -> Grammar | None:
        """A Grammar from TGI's JSON object (the offline API accepts either)."""
        if grammar is None or isinstance(grammar, Grammar):
            return grammar
        if not isinstance(grammar, dict) or set(grammar) - {"type", "value"}:
            raise _invalid("must be an object {\"type\": ..., \"value\": ...}")
        return cls(type=grammar.get("type", ""), value=grammar.get("value"))

    def validate(self) -> None:
        if self.type not in GRAMMAR_TYPES:
            raise _invalid(f"`type` must be one of {list(GRAMMAR_TYPES)}, got {self.type!r}")
        if self.type == "regex":
            if not isinstance(self.value, str) or not self.value:
                raise _invalid("a regex grammar's `value` must be a non-empty string")
        else:
            self.schema()  # raises when the value is not a JSON object
        if len(self.text()) > MAX_GRAMMAR_CHARS:
            raise _invalid(f"is longer than {MAX_GRAMMAR_CHARS} characters")

    def schema(self) -> dict[str, Any]:
        """The JSON schema of a json / json_schema grammar."""
        value = self.value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise _invalid(f"`value` is not valid JSON: {e}") from None
        if self.type == "json_schema":
            if not isinstance(value, dict) or not isinstance(value.get("schema"), dict):
                raise _invalid("a json_schema grammar's `value` must be {\"schema\": {...}}")
            value = value["schema"]
        if not isinstance(value, dict):
            raise _invalid("a JSON grammar's `value` must be a JSON schema object")
        return value

    def text(self) -> str:
        """The pattern, or the schema as compact JSON (what the size limit counts, and the
        compiled-grammar cache's key). Keys keep their order: the answer lists an object's
        properties in the order its schema does, so reordered schemas are other grammars."""
        return self._text

    @functools.cached_property
    def _text(self) -> str:  # computed once: a large schema takes ~0.3 ms to serialise
        if self.type == "regex":
            return str(self.value)
        return json.dumps(self.schema(), separators=(",", ":"))

    def attach(self, compiled: Any) -> None:
        """Keep `compiled` (the GrammarCompiler's template) with this grammar, so the engine
        finds what the worker's intake prepared even after the cache let it go."""
        self.__dict__["_compiled"] = compiled  # frozen: not a field, like `_text`

    @property
    def compiled(self) -> Any:
        """What `attach` kept, or None."""
        return self.__dict__.get("_compiled")


def _invalid(what: str) -> ValidationError:
    return ValidationError(f"Input validation error: `grammar` {what}")
