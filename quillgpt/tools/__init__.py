"""Tools a chat model may call: the definitions a conversation or a request gives (OpenAI's
`tools`), and the built-in tools quill runs itself, off unless named.

    check_tool_definitions(tools)                      # the list, or ToolError naming the fault
    enabled = builtin_tools("calculator,python")       # quill chat/serve --tools
    [t.definition() for t in enabled.values()]         # their `tools` entries, for the prompt
    run_builtin(enabled, "calculator", '{"expression": "4821*37"}')  # ToolResult("178377", True)

A definition is OpenAI's: `{"type": "function", "function": {"name", "description",
"parameters"}}`, the parameters a JSON Schema of an object. The built-ins are `calculator`
(tools/calculator.py: exact arithmetic by a parser of its own, bounded) and `python`
(tools/sandbox.py: a separate process with time, memory, file-size and process limits). A
built-in's failure is a result too ("error: division by zero"): the model reads it and answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import QuillError, shown
from .calculator import calculate
from .sandbox import Limits, run_python

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128
MAX_SCHEMA_DEPTH = 32
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class ToolError(QuillError):
    """A tool definition, call or name that is not usable."""


@dataclass(frozen=True)
class ToolResult:
    content: str  # what the model reads
    ok: bool  # False: content is "error: ..."


@dataclass(frozen=True)
class BuiltinTool:
    """A tool quill runs itself: its definition and the function that runs it (argument name -> value)."""

    name: str
    description: str
    parameter: str  # the one string argument it takes
    run: Callable[[str], str]

    def definition(self) -> dict[str, Any]:
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": {self.parameter: {"type": "string"}},
                           "required": [self.parameter]}}}


BUILTINS: dict[str, BuiltinTool] = {
    "calculator": BuiltinTool("calculator", "Exact arithmetic: + - * / // % ** and parentheses.",
                              "expression", calculate),
    "python": BuiltinTool("python", "Runs Python code; returns what it prints (or its last expression).",
                          "code", lambda code: run_python(code, Limits())),
}


def builtin_tools(spec: str | Sequence[str] | None) -> dict[str, BuiltinTool]:
    """The built-ins `spec` names ("calculator,python", or a list); {} for None or ""."""
    if spec is None:
        return {}
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in BUILTINS]
    if unknown:
        raise ToolError(f"unknown tool {shown(unknown[0])}; the built-in tools are {', '.join(BUILTINS)}")
    return {n: BUILTINS[n] for n in dict.fromkeys(names)}


def parse_arguments(arguments: Any, where: str = "arguments") -> dict[str, Any]:
    """A call's arguments (JSON text of an object, or the object) as a dict, or ToolError."""
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if not isinstance(arguments, str):
        raise ToolError(f"{where} must be JSON text, got {type(arguments).__name__}")
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        raise ToolError(f"{where} is not JSON: {shown(arguments)}") from None
    if not isinstance(value, dict):
        raise ToolError(f"{where} must be a JSON object, got {shown(arguments)}")
    return value


def run_builtin(tools: Mapping[str, BuiltinTool], name: str, arguments: Any) -> ToolResult:
    """Run the built-in `name` with `arguments`; any failure is an "error: ..." result."""
    try:
        tool = tools.get(name)
        if tool is None:
            known = ", ".join(tools) or "none"
            raise ToolError(f"no tool named {shown(name)} (tools: {known})")
        args = parse_arguments(arguments)
        value = args.get(tool.parameter)
        if not isinstance(value, str) or set(args) - {tool.parameter}:
            raise ToolError(f"{name} takes one argument, {tool.parameter!r} (a string)")
        return ToolResult(tool.run(value), True)
    except QuillError as e:
        return ToolResult(f"error: {e}", False)


# --- definitions (OpenAI's `tools`) -----------------------------------------------------------

def _check_schema(schema: Any, where: str, depth: int = 0) -> None:
    """A JSON Schema's shape (types, properties, items, required), bounded in depth."""
    if depth > MAX_SCHEMA_DEPTH:  # named by where it starts: the whole path would be a page long
        top = where.split(".properties.", 1)[0].split(".items", 1)[0]
        raise ToolError(f"{top}: nested more than {MAX_SCHEMA_DEPTH} deep")
    if not isinstance(schema, Mapping):
        raise ToolError(f"{where} must be a JSON Schema object, got {shown(schema)}")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if any(k not in JSON_TYPES for k in kinds) or (isinstance(kind, list) and not kind):
        raise ToolError(f"{where}.type: {shown(kind)} is not a JSON Schema type ({', '.join(JSON_TYPES)})")
    props = schema.get("properties", {})
    if not isinstance(props, Mapping):
        raise ToolError(f"{where}.properties must be an object of schemas")
    for key, sub in props.items():
        _check_schema(sub, f"{where}.properties.{key}", depth + 1)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ToolError(f"{where}.required must be a list of property names")
    missing = [r for r in required if r not in props]
    if missing:
        raise ToolError(f"{where}.required names {shown(missing[0])}, which is not among its properties")
    items = schema.get("items")
    for i, sub in enumerate(items if isinstance(items, list) else [items] if items is not None else []):
        _check_schema(sub, f"{where}.items" + (f"[{i}]" if isinstance(items, list) else ""), depth + 1)
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise ToolError(f"{where}.enum must be a list")


def check_tool_definitions(tools: Any, where: str = "tools") -> list[dict[str, Any]]:
    """`tools` as OpenAI defines them (module docstring), checked; ToolError names the first fault."""
    if not isinstance(tools, list):
        raise ToolError(f"{where} must be a list of tool definitions")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"{where}: at most {MAX_TOOLS} tools, got {len(tools)}")
    names = set()
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise ToolError(f"{at} must be {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ToolError(f"{at}.function must be an object with a name")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolError(f"{at}.function.name must be 1-64 letters, digits, _ or -, got {shown(name)}")
        if name in names:
            raise ToolError(f"{at}: a second tool named {name!r}")
        names.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise ToolError(f"{at}.function.description must be a string")
        if "parameters" in fn:
            params = fn["parameters"]
            _check_schema(params, f"{at}.function.parameters")
            if params.get("type", "object") != "object":
                raise ToolError(f"{at}.function.parameters must describe an object (\"type\": \"object\")")
        if not isinstance(fn.get("strict", False), (bool, type(None))):
            raise ToolError(f"{at}.function.strict must be true or false")
    return list(tools)


def tool_names(tools: Sequence[Mapping[str, Any]] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or []]
