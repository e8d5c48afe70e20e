"""Chat templates: a list of messages -> the prompt (text, or token ids) a chat model was trained on.

Templates are Jinja2 source, as GGUF files (`tokenizer.chat_template`) and HF tokenizer configs
carry them. A template from a model file is untrusted code: it runs in Jinja2's immutable
sandbox, under time, loop, call, size and output limits (`TemplateLimits`, see
lmengine.chat_sandbox), with the environment HF transformers gives templates, so a template
renders here as it does in `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on, the
`loopcontrols` extension, `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that keeps
non-ASCII text as is, and the variables `messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, `tools`, `documents` plus whatever the caller passes.

Messages are checked first: a non-empty list of dicts, each with a `role` the template knows
(system, user, assistant, tool, or any name the template's source mentions as a string, such as
"ipython" or "developer") and a `content` that is a string, a list of text parts
({"type": "text", "text": ...}), or None in an assistant message with `tool_calls`.

`ChatTemplate.encode` gives the prompt's token ids with message contents kept as plain text: a
user who writes "<|im_end|>\\n<|im_start|>system\\n..." gets those characters as text, not the
control tokens that would forge a system turn; the role markers the template itself writes stay
control tokens. How: the template is rendered a second time with each content replaced by a
marker (private-use characters and its index), which tells where each content lies in the real
prompt (the template may trim or JSON-escape a content: the variants are tried; the marker
characters are chosen among those the prompt does not hold). When no control
token of the tokenized prompt overlaps a content, the ids are exactly `encode(prompt)`; otherwise
the prompt is encoded stretch by stretch between the template's own control tokens, with control
token text inside stretches left as text. A template that transforms contents in other ways
(`content.split(...)`, `'x' in content`) is fine while no content holds control-token text; a
content that does is then refused (ChatTemplateError), as is control-token text in any other
field the template writes (a message's `name`, `tool_calls`, the `tools`). Pass
`parse_special_in_content=True` for the old behaviour: the rendered text parsed as a whole.

A file without a template gets ChatML (`<|im_start|>role\\n...<|im_end|>`), as llama.cpp does.
"""
from __future__ import annotations

import bisect
import json
import re
from datetime import datetime
from typing import Any, Iterator, Mapping, Sequence

import jinja2
import jinja2.ext

from .chat_sandbox import LimitedSandbox, LimitExceeded, TemplateLimits, render_limited
from .errors import ChatTemplateError, InvalidParameterError, TokenizerError
from .vocab import PARSED_SPECIAL_TYPES, all_of_type, special_token_id

__all__ = ["ChatTemplate", "TemplateLimits", "NAMED_TEMPLATES", "DEFAULT_ROLES", "validate_messages"]

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 2 chat: the system prompt goes inside the first [INST] block.
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_text = '<<SYS>>\n' + messages[0]['content'] | trim + '\n<</SYS>>\n\n' %}"
        "{% set turns = messages[1:] %}"
        "{% else %}{% set system_text = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('llama2 template: roles must alternate user/assistant/user/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + ((system_text if loop.first else '') + message['content']) | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{{ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> LimitedSandbox:
    return LimitedSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=[jinja2.ext.loopcontrols, _GenerationTag],
                          filters={"tojson": _tojson},
                          globals={"raise_exception": _raise_exception, "strftime_now": _strftime_now})


_ENV = _environment()

DEFAULT_ROLES = frozenset({"system", "user", "assistant", "tool"})
# A string literal of a template that can be a role name ('ipython', 'developer', 'model'...).
_ROLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


class ChatTemplate:
    """A compiled chat template, the BOS/EOS token texts it may refer to, and its limits.

    limits: TemplateLimits for each render (None: the defaults); `self.limits` may be replaced.
    allowed_roles: the roles messages may have (DEFAULT_ROLES plus the names the source mentions).
    """

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "custom",
                 limits: TemplateLimits | None = None):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"chat template {name!r} is empty or not a string")
        for what, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None and not isinstance(token, str):
                raise ChatTemplateError(f"chat template {name!r}: {what} must be a str, got {type(token).__name__}")
        if limits is None:
            limits = TemplateLimits()
        elif not isinstance(limits, TemplateLimits):
            raise InvalidParameterError(f"limits must be a TemplateLimits, got {type(limits).__name__}")
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.name = name
        self.limits = limits
        try:
            self._template, literals = _ENV.compile_limited(source, limits)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template {name!r} does not parse: line {e.lineno}: {e.message}") from e
        except LimitExceeded as e:
            raise ChatTemplateError(f"chat template {name!r} is too long: {e} "
                                    f"(TemplateLimits.{e.limit})") from None
        except RecursionError:
            raise ChatTemplateError(f"chat template {name!r} is nested too deeply to compile") from None
        self.allowed_roles = DEFAULT_ROLES | {s for s in literals if _ROLE_NAME.fullmatch(s)}

    @classmethod
    def named(cls, name: str, bos_token: str = "", eos_token: str = "",
              limits: TemplateLimits | None = None) -> "ChatTemplate":
        """A built-in template: "chatml", "llama2", "llama3" or "zephyr"."""
        if name not in NAMED_TEMPLATES:
            raise ChatTemplateError(f"no built-in chat template {name!r} (have: {', '.join(NAMED_TEMPLATES)})")
        return cls(NAMED_TEMPLATES[name], bos_token, eos_token, name=name, limits=limits)

    @classmethod
    def from_gguf(cls, f, limits: TemplateLimits | None = None) -> "ChatTemplate":
        """The template of a GGUF file (`tokenizer.chat_template`), ChatML when it has none.
        ChatTemplateError naming the key when a value it reads has the wrong type."""
        meta = f.metadata
        path = getattr(f, "path", "<gguf>")
        tokens = meta.get("tokenizer.ggml.tokens") or []
        if not isinstance(tokens, (list, tuple)) or not all_of_type(tokens, str):
            raise ChatTemplateError(f"{path}: metadata key 'tokenizer.ggml.tokens' should be a list of "
                                    f"strings, found {type(tokens).__name__}")

        def token_text(key):
            if not tokens:
                return ""
            try:
                i = special_token_id(meta, key, len(tokens), path)
            except TokenizerError as e:
                raise ChatTemplateError(str(e)) from None
            return tokens[i] if i is not None else ""

        bos, eos = token_text("tokenizer.ggml.bos_token_id"), token_text("tokenizer.ggml.eos_token_id")
        source = meta.get("tokenizer.chat_template")
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError(f"{path}: metadata key 'tokenizer.chat_template' should be a string, "
                                    f"found {type(source).__name__}")
        if not source:
            return cls.named("chatml", bos, eos, limits=limits)
        return cls(source, bos, eos, name=f"{path}:tokenizer.chat_template", limits=limits)

    @classmethod
    def for_tokenizer(cls, tokenizer, limits: TemplateLimits | None = None) -> "ChatTemplate":
        """The template an `lmengine.tokenizer.Tokenizer` carries, ChatML when it has none."""
        if tokenizer.chat_template:
            return cls(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                       name=f"{tokenizer.source}:chat_template", limits=limits)
        return cls.named("chatml", tokenizer.bos_token, tokenizer.eos_token, limits=limits)

    # -- rendering ----------------------------------------------------------------------------------
    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text for `messages` ([{"role": "user", "content": "Hi"}, ...]).

        `add_generation_prompt` appends the header that starts the assistant's reply. Keyword
        arguments become template variables (e.g. `tools=[...]`, `bos_token=...`).
        """
        validate_messages(messages, self.allowed_roles)
        return self._render(messages, add_generation_prompt, extra)

    def _render(self, messages, add_generation_prompt, extra: dict) -> str:
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "tools": None, "documents": None}
        variables.update(extra)
        variables["messages"] = [dict(m) for m in messages]
        variables["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return render_limited(self._template, variables, self.limits)
        except LimitExceeded as e:
            raise ChatTemplateError(f"chat template {self.name!r} stopped at a limit: {e} "
                                    f"(TemplateLimits.{e.limit} = {getattr(self.limits, e.limit, None)!r})") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template {self.name!r} failed to render: {e}") from e
        except RecursionError:
            raise ChatTemplateError(f"chat template {self.name!r} failed to render: nested too deeply "
                                    f"(Python's recursion limit)") from None
        except Exception as e:  # the template is foreign code: whatever it raises is its failure
            raise ChatTemplateError(
                f"chat template {self.name!r} failed to render: {type(e).__name__}: {e}") from e

    # -- token ids ----------------------------------------------------------------------------------
    def encode(self, messages: Sequence[Mapping[str, Any]], tokenizer, *, add_generation_prompt: bool = True,
               parse_special_in_content: bool = False, add_bos: bool | None = None, **extra) -> list[int]:
        """Token ids of the prompt for `messages`, message contents kept as plain text.

        tokenizer: an `lmengine.tokenizer.Tokenizer`. Control-token text inside a message's
        content (or a text part) is encoded as text; the tokens the template writes stay control
        tokens (see the module docstring). ChatTemplateError when another field the template
        writes holds control-token text, or when the template transforms contents one of which
        holds it. `parse_special_in_content=True`: the rendered text is encoded as a whole with
        control tokens parsed everywhere (the old behaviour).
        add_bos: None follows the tokenizer; BOS is never added when the template wrote it.
        Without control-token text in the contents the ids are `encode(render(...))`'s.
        """
        validate_messages(messages, self.allowed_roles)
        text = self._render(messages, add_generation_prompt, extra)
        ids, offsets = tokenizer.encode_with_offsets(text, parse_special=True)
        if not parse_special_in_content:
            _check_fields(tokenizer, messages, extra)
            ids = self._keep_contents_plain(messages, add_generation_prompt, extra, tokenizer, text, ids, offsets)
        want_bos = tokenizer.add_bos if add_bos is None else bool(add_bos)
        if want_bos and ids[:1] == [tokenizer.bos_id]:
            want_bos = False                           # the template wrote BOS itself
        return tokenizer.wrap(ids, add_bos=want_bos)

    def _keep_contents_plain(self, messages, add_generation_prompt, extra, tokenizer, text: str,
                             ids: list[int], offsets: list) -> list[int]:
        marks = _free_marks(text)
        contents, marked = _mark_contents(messages, marks)
        if not contents:
            return ids
        pieces = None
        if marks is not None:
            try:
                marked_text = self._render(marked, add_generation_prompt, extra)
            except ChatTemplateError:                  # the template looks into contents
                marked_text = None
            if marked_text is not None:
                pieces = _align(marked_text, text, [c for _, c in contents], marks)
        if pieces is None:
            # The template transforms contents: whole-text encoding is safe while none of them
            # holds control-token text.
            for path, content in contents:
                hits = tokenizer.find_special_tokens(content)
                if hits:
                    start, end, _ = hits[0]
                    raise ChatTemplateError(
                        f"{path} holds the control token text {content[start:end]!r} (at character {start}), "
                        f"and chat template {self.name!r} transforms message contents, so they cannot be kept "
                        f"apart from its own text: remove it, or pass parse_special_in_content=True to let "
                        f"it act as that token")
            return ids
        if not _special_inside_contents(tokenizer, ids, offsets, pieces):
            return ids
        return _encode_stretches(tokenizer, pieces)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, {len(self.source)} chars)"


# -- messages -------------------------------------------------------------------------------------
def validate_messages(messages, allowed_roles=DEFAULT_ROLES) -> None:
    """Check that `messages` is a non-empty list of {"role": str, "content": ...} dicts.

    A role must be in `allowed_roles` (None: any). Content is a str, a list of text parts
    ({"type": "text", "text": str}), or None in a message with `tool_calls` (a list).
    ChatTemplateError naming the message index and the field otherwise.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            "messages must be a list of dicts like {'role': 'user', 'content': '...'}, "
            f"got {type(messages).__name__}")
    if len(messages) == 0:
        raise ChatTemplateError("messages is empty: a chat needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}]['role'] must be a non-empty str, got {role!r}")
        if allowed_roles is not None and role not in allowed_roles:
            raise ChatTemplateError(
                f"messages[{i}]['role'] is {role[:40]!r}, a role this chat template does not know "
                f"(known: {', '.join(sorted(allowed_roles))})")
        if "content" not in message and "tool_calls" not in message:
            raise ChatTemplateError(f"messages[{i}] (role {role!r}) has no 'content'")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and (isinstance(tool_calls, (str, bytes, Mapping))
                                       or not isinstance(tool_calls, Sequence)):
            raise ChatTemplateError(
                f"messages[{i}]['tool_calls'] (role {role!r}) must be a list, got {type(tool_calls).__name__}")
        content = message.get("content")
        if isinstance(content, str) or (content is None and tool_calls):
            continue
        if isinstance(content, Sequence) and not isinstance(content, (str, bytes)):
            _validate_parts(content, f"messages[{i}]['content']")
            continue
        raise ChatTemplateError(
            f"messages[{i}]['content'] (role {role!r}) must be a str or a list of text parts, "
            f"got {type(content).__name__}" + (" (None is only allowed with 'tool_calls')" if content is None else ""))


def _validate_parts(parts: Sequence, where: str) -> None:
    for j, part in enumerate(parts):
        if not isinstance(part, Mapping):
            raise ChatTemplateError(f"{where}[{j}] must be a dict like {{'type': 'text', 'text': '...'}}, "
                                    f"got {type(part).__name__}")
        kind = part.get("type")
        if kind != "text":
            raise ChatTemplateError(f"{where}[{j}] has type {kind!r}: only text parts "
                                    f"({{'type': 'text', 'text': '...'}}) are supported")
        if not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"{where}[{j}]['text'] must be a str, got {type(part.get('text')).__name__}")


# -- keeping contents plain text ------------------------------------------------------------------
# A content is replaced by a marker: open + its index + close, two characters of the Supplementary
# Private Use Area-A that the rendered prompt does not hold (so every marker is one of ours).
def _free_marks(text: str) -> tuple[str, str] | None:
    """(open, close): two private-use characters absent from text; None if it holds them all."""
    used = set(text)
    for cp in range(0xF0000, 0xFFFFD, 2):
        if chr(cp) not in used and chr(cp + 1) not in used:
            return chr(cp), chr(cp + 1)
    return None


def _mark_contents(messages, marks: tuple[str, str] | None) -> tuple[list[tuple[str, str]], list[dict]]:
    """([(where, content)...], messages with each content replaced by its marker)."""
    contents: list[tuple[str, str]] = []
    marked = []
    mark_open, mark_close = marks or ("", "")

    def mark(where: str, content: str) -> str:
        contents.append((where, content))
        return f"{mark_open}{len(contents) - 1}{mark_close}"

    for i, message in enumerate(messages):
        message = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = mark(f"messages[{i}]['content']", content)
        elif isinstance(content, Sequence) and not isinstance(content, (str, bytes)):
            parts = []
            for j, part in enumerate(content):
                part = dict(part)
                part["text"] = mark(f"messages[{i}]['content'][{j}]['text']", part["text"])
                parts.append(part)
            message["content"] = parts
        marked.append(message)
    return contents, marked


def _variants(content: str) -> list[str]:
    """What a template may write for a content: as is, trimmed, or JSON-escaped (`tojson`)."""
    out = []
    for v in (content, content.strip(), content.lstrip(), content.rstrip(),
              json.dumps(content, ensure_ascii=False)[1:-1]):
        if v not in out:
            out.append(v)
    return out


def _align(marked_text: str, text: str, contents: list[str], marks: tuple[str, str]) -> list[tuple[str, bool]] | None:
    """Split `text` into [(piece, is_content)...] using the render with markers; None when the
    template does not write each content as one of its _variants (it transforms contents)."""
    mark_open, mark_close = marks
    parts = re.split(f"{mark_open}(\\d+){mark_close}", marked_text)   # [template, index, ..., template]
    if not text.startswith(parts[0]):
        return None
    pieces = [(parts[0], False)]
    pos = len(parts[0])
    for j in range(1, len(parts), 2):
        k, after = int(parts[j]), parts[j + 1]
        if k >= len(contents):
            return None
        last = j + 2 >= len(parts)
        for variant in _variants(contents[k]):
            end = pos + len(variant)
            if text.startswith(variant, pos) and text.startswith(after, end) and \
                    (not last or end + len(after) == len(text)):
                break
        else:
            return None
        pieces += [(variant, True), (after, False)]
        pos = end + len(after)
    return pieces if pos == len(text) else None


def _special_inside_contents(tokenizer, ids: list[int], offsets: list, pieces: list[tuple[str, bool]]) -> bool:
    """Whether a control token of the whole-text encoding overlaps a content piece."""
    starts, ends, pos = [], [], 0
    for piece, is_content in pieces:
        if is_content and piece:
            starts.append(pos)
            ends.append(pos + len(piece))
        pos += len(piece)
    types = tokenizer.token_types
    for token_id, (start, end) in zip(ids, offsets):
        if types[token_id] in PARSED_SPECIAL_TYPES:
            k = bisect.bisect_right(ends, start)          # first content ending after the token starts
            if k < len(starts) and starts[k] < end:
                return True
    return False


def _encode_stretches(tokenizer, pieces: list[tuple[str, bool]]) -> list[int]:
    """Ids of the pieces: the control tokens written by the template (found in template pieces
    only), and the text between them encoded with control-token text left as text."""
    ids: list[int] = []
    stretch: list[str] = []

    def flush():
        text = "".join(stretch)
        stretch.clear()
        if text:
            ids.extend(tokenizer.encode_with_offsets(text, parse_special=False)[0])

    for piece, is_content in pieces:
        pos = 0
        if not is_content:
            for start, end, token_id in tokenizer.find_special_tokens(piece):
                stretch.append(piece[pos:start])
                flush()
                ids.append(token_id)
                pos = end
        stretch.append(piece[pos:])
    flush()
    return ids


_NOT_CHECKED_VARIABLES = ("bos_token", "eos_token", "add_generation_prompt")


def _check_fields(tokenizer, messages, extra: dict) -> None:
    """ChatTemplateError when a string the template may write as its own text - any message field
    but the contents, or a template variable (tools...) - holds control-token text."""
    for where, text in _field_strings(messages, extra):
        hits = tokenizer.find_special_tokens(text)
        if hits:
            start, end, _ = hits[0]
            raise ChatTemplateError(
                f"{where} holds the control token text {text[start:end]!r} (at character {start}); only "
                f"message contents are kept as plain text, other fields are written as template text where "
                f"it would act as that token: remove it, or pass parse_special_in_content=True to allow it")


def _field_strings(messages, extra: dict) -> Iterator[tuple[str, str]]:
    for i, message in enumerate(messages):
        for key, value in message.items():
            where = f"messages[{i}][{key!r}]"
            if isinstance(key, str):
                yield f"messages[{i}] key", key
            if key == "content" and isinstance(value, Sequence) and not isinstance(value, str):
                for j, part in enumerate(value):
                    yield from _strings({k: v for k, v in part.items() if k != "text"}, f"{where}[{j}]")
            elif key != "content":
                yield from _strings(value, where)
    for name, value in extra.items():
        if name not in _NOT_CHECKED_VARIABLES:
            yield from _strings(value, name)


def _strings(value, where: str) -> Iterator[tuple[str, str]]:
    """Every string inside value (dict keys too), with where it is."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str):
                yield f"{where} key", key
            yield from _strings(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            yield from _strings(item, f"{where}[{j}]")
