"""Chat templates against HF transformers' `apply_chat_template` on the same template source.

The transformers tokenizer is built from the tokenizer.json our Tokenizer writes for the bundled
SmolLM2 GGUF (no hub access); the rendered text must be identical.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmengine.converters.gguf_file import GGUFFile
from lmengine.chat import NAMED_TEMPLATES, ChatTemplate
from lmengine.errors import ChatTemplateError
from lmengine.tokenizer import Tokenizer
from references import reference_file

REFERENCE = Path(reference_file("smollm2_reference.json"))


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_path):  # smollm2_path: tests/conftest.py
    return GGUFFile(smollm2_path)


@pytest.fixture(scope="module")
def template(smollm2_gguf):
    return ChatTemplate.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf, tmp_path_factory):
    """transformers' PreTrainedTokenizerFast over our tokenizer.json (bos/eos set as in the GGUF)."""
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer.from_gguf(smollm2_gguf)
    out = tmp_path_factory.mktemp("smollm2_chat")
    tok.save_pretrained(out)
    return PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"),
                                   bos_token=tok.bos_token, eos_token=tok.eos_token)


def _hf_render(hf_tokenizer, source, messages, add_generation_prompt, **extra):
    return hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                            add_generation_prompt=add_generation_prompt, **extra)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Écris « bonjour » en 中文 😀\n\n  with  spaces  "}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "{{ not a template }} {% raw %}"}],
]


def test_gguf_template_is_read(template, smollm2_gguf):
    assert template.source == smollm2_gguf.metadata["tokenizer.chat_template"]
    assert (template.bos_token, template.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_template_matches_transformers(template, hf_tokenizer, messages, add_generation_prompt):
    expected = _hf_render(hf_tokenizer, template.source, messages, add_generation_prompt)
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_reference_chat_prompt(template):
    reference = json.loads(REFERENCE.read_text())
    prompt = next(p for p in reference["prompts"] if p["name"] == "chat_instruction")
    messages = [{"role": "user", "content": "Give me three short tips for writing clear technical documentation."}]
    assert template.render(messages) == prompt["text"]


ROLES = st.sampled_from(["system", "user", "assistant", "tool"])
MESSAGES = st.lists(st.fixed_dictionaries({"role": ROLES, "content": st.text(max_size=30)}),
                    min_size=1, max_size=5)


@given(MESSAGES, st.booleans())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_gguf_template_matches_transformers_random(template, hf_tokenizer, messages, add_generation_prompt):
    expected = _hf_render(hf_tokenizer, template.source, messages, add_generation_prompt)
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
@pytest.mark.parametrize("messages", CONVERSATIONS[1:3])
def test_named_templates_match_transformers(hf_tokenizer, name, messages):
    # llama2 needs user/assistant alternation after the system message: CONVERSATIONS[1:3] have it.
    chat = ChatTemplate.named(name, bos_token="<s>", eos_token="</s>")
    for add_generation_prompt in (True, False):
        expected = _hf_render(hf_tokenizer, chat.source, messages, add_generation_prompt,
                              bos_token="<s>", eos_token="</s>")
        assert chat.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_named_template_texts():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]
    assert ChatTemplate.named("chatml").render(messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>assistant\n")
    assert ChatTemplate.named("llama2", "<s>", "</s>").render(messages) == \
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s>"
    assert ChatTemplate.named("llama3", "<|begin_of_text|>", "<|eot_id|>").render(messages[1:2]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ChatTemplate.named("zephyr", "<s>", "</s>").render(messages[1:2]) == \
        "<|user|>\nU</s>\n<|assistant|>\n"


def test_missing_template_falls_back_to_chatml():
    f = SimpleNamespace(path="x.gguf", metadata={
        "tokenizer.ggml.tokens": ["<s>", "</s>", "a"],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1})
    chat = ChatTemplate.from_gguf(f)
    assert chat.source == NAMED_TEMPLATES["chatml"] and chat.name == "chatml"
    assert (chat.bos_token, chat.eos_token) == ("<s>", "</s>")


def test_hf_helpers_and_extra_variables(hf_tokenizer):
    source = ("{{ messages[0] | tojson }}|{{ strftime_now('%Y') }}|{{ bos_token }}|{{ custom }}"
              "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}#{{ m.role }}{% endfor %}"
              "{% generation %}G{% endgeneration %}")
    messages = [{"role": "user", "content": "中文 \"q\" <tag>"}, {"role": "assistant", "content": "x"}]
    chat = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    rendered = chat.render(messages, custom="C")
    assert rendered == _hf_render(hf_tokenizer, source, messages, True, custom="C", bos_token="<s>")
    assert rendered.startswith('{"role": "user", "content": "中文 \\"q\\" <tag>"}|')  # not ASCII-escaped
    assert f"|{datetime.now().year}|<s>|C#userG" in rendered


def test_trim_and_lstrip_blocks(hf_tokenizer):
    source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert ChatTemplate(source).render(messages) == "[a]\n[b]\n" == \
        _hf_render(hf_tokenizer, source, messages, True)


def test_for_tokenizer(smollm2_gguf, template):
    tok = Tokenizer.from_gguf(smollm2_gguf)
    chat = ChatTemplate.for_tokenizer(tok)
    assert chat.source == template.source and chat.eos_token == "<|im_end|>"


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("messages, message", [
    ("hello", "must be a list"),
    ({"role": "user", "content": "x"}, "must be a list"),
    ([], "empty"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"content": "x"}], r"messages\[0\]\['role'\]"),
    ([{"role": 3, "content": "x"}], r"messages\[0\]\['role'\]"),
    ([{"role": "user"}], r"messages\[0\] \(role 'user'\) has no 'content'"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": 5}], r"messages\[1\]\['content'\].*int"),
    ([{"role": "user", "content": None}], r"must be a str, got NoneType"),
])
def test_invalid_messages(messages, message):
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate.named("chatml").render(messages)


def test_tool_call_message_without_content_is_accepted():
    source = "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{"id": 1}]}]
    assert ChatTemplate(source).render(messages) == "user:q;assistant:None;"


def test_template_errors():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="empty"):
        ChatTemplate("  ")
    with pytest.raises(ChatTemplateError, match="no built-in chat template 'vicuna'"):
        ChatTemplate.named("vicuna")
    # raise_exception from the template becomes a ChatTemplateError with its message
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTemplate.named("llama2").render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    # the sandbox: no attribute escapes, no mutation of the messages
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "a"}])
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate("{{ messages.append(1) }}").render([{"role": "user", "content": "a"}])
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "a"}])
