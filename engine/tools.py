"""Tool calling for OpenAI-style chat requests: `tools` + `tool_choice` in, `tool_calls` out.

How the model learns about the tools: a chat template that uses the `tools` variable (Qwen,
Llama 3.1, Hermes...) renders them itself; for one that does not (SmolLM2's), a system message
lists the functions as JSON and asks for calls written as

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

(the Hermes convention, which many small instruct models were trained on).

tool_choice:
  - "none": no tools in the prompt, no parsing: the answer is text.
  - "auto" (the default with tools): the answer is parsed; if it holds tool calls of declared
    functions, they become `tool_calls` (finish_reason "tool_calls"), else it is text.
  - "required", or {"type": "function", "function": {"name": ...}} (a forced function): the
    output is constrained (SamplingParams.json_schema, a token mask: engine/constraints.py) to
    one JSON object {"name": ..., "arguments": {...}} whose arguments follow the function's
    `parameters` schema, so the parse always succeeds when the generation ends normally.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .openai_common import RequestError, plain_messages

_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_TOOLS = 128


@dataclass
class ToolPlan:
    """What a request's tools mean for its prompt and its answer."""

    functions: dict[str, dict]                  # name -> {"name", "description", "parameters"}
    choice: str                                 # "auto" | "none" | "required" | "function"
    forced: str | None = None                   # the forced function's name
    in_template: bool = False                   # the chat template renders `tools` itself
    tools: list = field(default_factory=list)   # the request's tools, as given

    @property
    def parse(self) -> bool:
        """Whether the answer is read for tool calls."""
        return self.choice != "none"

    @property
    def json_schema(self) -> dict | None:
        """The constraint of a forced or required call (None for auto/none)."""
        if self.choice == "function":
            return _call_schema(self.functions[self.forced])
        if self.choice == "required":
            return {"anyOf": [_call_schema(f) for f in self.functions.values()]}
        return None

    @property
    def template_kwargs(self) -> dict:
        return {"tools": self.tools} if self.in_template and self.choice != "none" else {}

    def prepare_messages(self, messages: list) -> list[dict]:
        """The request's messages for the chat template: text parts joined, earlier assistant
        tool calls written in the format the model is asked to use, the tool list added as a
        system message when the template does not render tools itself."""
        out = []
        for message in plain_messages(messages):
            calls = message.get("tool_calls")
            if message.get("role") == "assistant" and calls and not self.in_template:
                message = {"role": "assistant", "content": (message.get("content") or "") + "".join(
                    "<tool_call>" + json.dumps({"name": c.get("function", {}).get("name"),
                                                "arguments": _loads_or_keep(c.get("function", {}).get("arguments"))})
                    + "</tool_call>" for c in calls if isinstance(c, Mapping))}
            elif message.get("role") == "tool" and message.get("content") is None:
                message = dict(message, content="")
            out.append(message)
        if self.choice != "none" and not self.in_template:
            prompt = self.system_prompt()
            if out and out[0].get("role") == "system":
                out[0] = dict(out[0], content=f"{out[0].get('content') or ''}\n\n{prompt}")
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out

    def system_prompt(self) -> str:
        listing = "\n".join(json.dumps({"type": "function", "function": f}) for f in self.functions.values())
        text = ("You can call functions. The available functions, as JSON schemas:\n"
                f"<tools>\n{listing}\n</tools>\n"
                "To call a function, reply with only:\n"
                '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>')
        if self.forced:
            text += f"\nCall the function {self.forced}."
        return text


def plan_tools(tools: Any, tool_choice: Any, chat_template) -> ToolPlan | None:
    """Validate a request's `tools` and `tool_choice` (RequestError naming the field)."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise RequestError("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise RequestError(f"tools must be a non-empty list of at most {MAX_TOOLS} tools", "tools")
    functions: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(fn, Mapping):
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RequestError(f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -, got {name!r}",
                               "tools")
        if name in functions:
            raise RequestError(f"tools[{i}]: function {name!r} is declared twice", "tools")
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        functions[name] = {"name": name, "description": str(fn.get("description", "")),
                           "parameters": dict(parameters)}
    forced = None
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        choice = tool_choice or "auto"
    elif (isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("function"), Mapping)):
        forced = tool_choice["function"].get("name")
        if forced not in functions:
            raise RequestError(f"tool_choice names function {forced!r}, which tools does not declare", "tool_choice")
        choice = "function"
    else:
        raise RequestError("tool_choice must be 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    in_template = chat_template is not None and "tools" in getattr(chat_template, "source", "")
    return ToolPlan(functions, choice, forced, in_template, list(tools))


def parse_tool_calls(text: str, plan: ToolPlan) -> list[dict] | None:
    """The tool calls in a model's answer, in OpenAI's shape, or None when it holds none (or
    names a function that was not declared: then it is text)."""
    candidates = [m.group(1) for m in _TOOL_CALL_RE.finditer(text)]
    if not candidates:
        candidates = [text.strip()]
    calls = []
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            return None
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, Mapping) or item.get("name") not in plan.functions:
                return None
            arguments = item.get("arguments", item.get("parameters", {}))
            if isinstance(arguments, str):
                arguments = _loads_or_keep(arguments)
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": item["name"], "arguments": json.dumps(arguments)}})
    return calls or None


def _call_schema(function: dict) -> dict:
    return {"type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": function["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def _loads_or_keep(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value if value is not None else {}
