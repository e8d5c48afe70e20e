"""What the OpenAI-compatible layers share (engine/openai_compat.py, engine/tools.py, the
server): the request error with its HTTP status and field, the error object, and messages with
their text parts joined."""
from __future__ import annotations

from collections.abc import Mapping

from .errors import InvalidParameterError


class RequestError(InvalidParameterError):
    """A request the client got wrong (HTTP 400 in the server), naming the request field
    (`param`, None when it concerns the whole request)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def plain_messages(messages: list) -> list[dict]:
    """Messages with list-of-text-parts contents joined into strings (templates expect text)."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestError(f"messages[{i}] must be an object", "messages")
        message = dict(message)
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}].content[{j}]: only text parts are supported", "messages")
                texts.append(part["text"])
            message["content"] = "".join(texts)
        out.append(message)
    return out
