"""Chat templates under TemplateLimits (lmengine.chat_sandbox).

1. Real templates still render exactly as HF transformers' `apply_chat_template` renders the same
   source (the bundled SmolLM2 one, the built-in ones, and Llama 3.1, Qwen 2.5, Mistral 7B v0.3 and
   Gemma 2, transcribed below from their models' tokenizer_config.json - the comparison is on the
   same source, so a transcription slip could not hide a difference), and a 1,000-message
   conversation renders under the default limits.
2. Templates that try to use up the machine stop with a ChatTemplateError naming the limit, fast
   and without building the big value (peak memory measured with tracemalloc).
"""
from __future__ import annotations

import threading
import time
import tracemalloc

import pytest

from lmengine.chat import NAMED_TEMPLATES, ChatTemplate, TemplateLimits
from lmengine.converters.gguf_file import GGUFFile
from lmengine.errors import ChatTemplateError, InvalidParameterError
from lmengine.tokenizer import Tokenizer

LLAMA_3_1 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN_2_5 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

MISTRAL_0_3 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

GEMMA_2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
           "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
           "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

REAL = {  # name: (source, bos, eos)
    "llama3.1": (LLAMA_3_1, "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2.5": (QWEN_2_5, "", "<|im_end|>"),
    "mistral0.3": (MISTRAL_0_3, "<s>", "</s>"),
    "gemma2": (GEMMA_2, "<bos>", "<eos>"),
}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city (\"quoted\", <b>tags</b>, 中文).",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                     "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}

CHAT = [{"role": "system", "content": "  You are terse.  "},
        {"role": "user", "content": "Hi! Écris « bonjour » 😀\n\n  with  spaces  "},
        {"role": "assistant", "content": " Bonjour ! "},
        {"role": "user", "content": "And {{ this }} {% raw %} <|im_start|> stays text?"}]


def _tool_chat(call_id="abc123XYZ"):
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}]},
            {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21, "sky": "clear"}'},
            {"role": "assistant", "content": "21 °C and clear."},
            {"role": "user", "content": "Thanks; and tomorrow?"}]


CASES = {  # name: [(messages, template variables)]
    "llama3.1": [(CHAT, {}), (CHAT[1:], {}), (_tool_chat(), {"tools": [WEATHER_TOOL]}),
                 (_tool_chat(), {"tools": [WEATHER_TOOL], "tools_in_user_message": False})],
    "qwen2.5": [(CHAT, {}), (CHAT[1:], {}), (_tool_chat(), {"tools": [WEATHER_TOOL]}), (_tool_chat(), {})],
    "mistral0.3": [(CHAT, {}), (CHAT[1:], {}), (_tool_chat(), {"tools": [WEATHER_TOOL]})],
    "gemma2": [(CHAT[1:], {})],
}


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path, tmp_path_factory):  # smollm2_path: tests/conftest.py
    """transformers' tokenizer over the tokenizer.json we write for the bundled SmolLM2 (its
    apply_chat_template renders any template source given to it)."""
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer.from_gguf(GGUFFile(smollm2_path))
    out = tmp_path_factory.mktemp("smollm2_limits")
    tok.save_pretrained(out)
    return PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"),
                                   bos_token=tok.bos_token, eos_token=tok.eos_token)


@pytest.mark.parametrize("name, case", [(n, i) for n, cases in CASES.items() for i in range(len(cases))])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_templates_match_transformers(hf_tokenizer, name, case, add_generation_prompt):
    source, bos, eos = REAL[name]
    messages, variables = CASES[name][case]
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                add_generation_prompt=add_generation_prompt,
                                                bos_token=bos, eos_token=eos, **variables)
    chat = ChatTemplate(source, bos, eos, name=name)
    assert chat.render(messages, add_generation_prompt=add_generation_prompt, **variables) == expected


def test_real_templates_know_their_roles():
    assert "ipython" in ChatTemplate(*REAL["llama3.1"]).allowed_roles
    assert "tool_results" in ChatTemplate(*REAL["mistral0.3"]).allowed_roles
    # subscript keys (message['role'], message['content']) are not role names
    assert ChatTemplate(*REAL["gemma2"]).allowed_roles >= {"model", "user", "assistant"}
    assert "content" not in ChatTemplate(*REAL["gemma2"]).allowed_roles


def _long_chat(n):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}: " + "word " * 50}
            for i in range(n)]


@pytest.mark.parametrize("name", sorted(REAL) + sorted(NAMED_TEMPLATES) + ["smollm2"])
def test_a_long_conversation_renders_under_the_default_limits(name, smollm2_path):
    if name == "smollm2":
        chat = ChatTemplate.from_gguf(GGUFFile(smollm2_path))
    elif name in REAL:
        chat = ChatTemplate(*REAL[name])
    else:
        chat = ChatTemplate.named(name, "<s>", "</s>")
    messages = _long_chat(1000)
    t0 = time.perf_counter()
    text = chat.render(messages)
    assert time.perf_counter() - t0 < chat.limits.timeout_s / 2
    assert "message 999: word" in text
    # ten times the default limits' margin: the same conversation with 1/10 of each count limit
    small = TemplateLimits(max_loop_iterations=100_000, max_calls=100_000)
    assert ChatTemplate(chat.source, chat.bos_token, chat.eos_token, limits=small).render(messages) == text


# -- templates that try to use up the machine ---------------------------------------------------
M = [{"role": "user", "content": "hi"}]

# (template, the TemplateLimits field its error names). Each must stop well under a second and
# without building its big value.
SIZE_ATTACKS = [
    ("{{ 'x' * 10**9 }}", "max_value_size"),
    ("{% set s = 'x' * 10**9 %}", "max_value_size"),
    ("{{ [1, 2] * 10**9 }}", "max_value_size"),
    ("{{ 10 ** 100000000 }}", "max_value_size"),
    ("{% set ns = namespace(x=3) %}{% for i in range(100) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
     "max_value_size"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "max_value_size"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "max_value_size"),
    # a list holding the same list twice, 64 times over: tiny in memory, 2**64 when printed
    ("{% set ns = namespace(a=[1]) %}{% for i in range(64) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a }}",
     "max_value_size"),
    ("{{ 'x'.ljust(10**9) }}", "max_value_size"),
    ("{{ ('\t' * 1000).expandtabs(10**7) }}", "max_value_size"),
    ("{% set s = 'x' * 100000 %}{{ s.replace('', s) }}", "max_value_size"),
    ("{% set s = 'a' * 100000 %}{{ s.translate({97: 'x' * 100000}) }}", "max_value_size"),
    ("{{ ('x' * 100000).join([''] * 100) }}", "max_value_size"),
    ("{{ '%1000000000s' % 'x' }}", "max_value_size"),
    ("{{ '%*s' % (10**9, 'x') }}", "max_value_size"),
    ("{{ '{:>1000000000}'.format('x') }}", "max_value_size"),
    ("{{ '{:>{w}}'.format('x', w=10**9) }}", "max_value_size"),
    ("{{ 'x' | center(10**9) }}", "max_value_size"),
    ("{{ ('a\n' * 1000) | indent(10**7) }}", "max_value_size"),
    ("{{ '%1000000000s' | format('x') }}", "max_value_size"),
    ("{% set s = 'x' * 100000 %}{{ s | replace('', s) }}", "max_value_size"),
    ("{{ ([''] * 100000) | join('x' * 100000) }}", "max_value_size"),
    ("{{ [1] | batch(10**9, 'x') | list }}", "max_value_size"),
    ("{{ [1] | slice(10**8) | list }}", "max_value_size"),
    ("{{ [[[[1]]]] | tojson(indent=10**8) }}", "max_value_size"),
    ("{{ ('a ' * 100000) | wordwrap(1, wrapstring='x' * 100000) }}", "max_value_size"),
    ("{{ lipsum(10**6) }}", "max_value_size"),
    ("{{ range(10**9) | list }}", "max_range"),
    ("{% set s = 'x' * 1000000 %}{% set b %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endset %}",
     "max_output_chars"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "max_depth"),
    ("{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}", "max_depth"),
]


@pytest.mark.parametrize("source, limit", SIZE_ATTACKS)
def test_size_attacks_are_refused_before_building(source, limit):
    chat = ChatTemplate(source)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(ChatTemplateError, match=rf"TemplateLimits\.{limit}"):
            chat.render(M)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    # the largest value any of these builds before refusing is below max_value_size (4e6 chars)
    # plus one of its operands: well under 64 MB
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.1f} MB"


@pytest.mark.parametrize("source, limit", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "max_loop_iterations"),
    ("{{ ('x' * 200000) | list | length }}", "max_loop_iterations"),
    ("{{ ('x' * 200000) | map('upper') | join }}", "max_loop_iterations"),
    ("{% for i in range(10) %}{{ loop.length }}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "max_loop_iterations"),
    ("{% macro f() %}{% endmacro %}{% for i in range(100000) %}{{ f() }}{% endfor %}", "max_calls"),
    ("{% for x in [1] recursive %}{% if loop.depth < 3 %}{{ loop(range(100000)) }}{% endif %}{% endfor %}",
     "max_loop_iterations"),
])
def test_count_limits(source, limit):
    limits = TemplateLimits(max_loop_iterations=50_000, max_calls=50_000)
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=rf"TemplateLimits\.{limit} = 50000"):
        ChatTemplate(source, limits=limits).render(M)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("source", [
    # no write, no call: only the loop hook reads the clock
    "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = i * j %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    # one C-level sum() of lists: the clock is read between its additions
    "{{ ([[1]] * 100000) | sum(start=[]) | length }}",
])
def test_deadline_stops_a_tight_loop(source):
    limits = TemplateLimits(timeout_s=0.3, max_loop_iterations=10**9)
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=r"longer than 0\.3 s.*TemplateLimits\.timeout_s"):
        ChatTemplate(source, limits=limits).render(M)
    assert time.perf_counter() - t0 < 1.5


def test_no_template_code_runs_while_compiling():
    """Jinja2 folds constant filter calls at compile time; here they only run when rendered."""
    t0 = time.perf_counter()
    chat = ChatTemplate("{% if false %}{{ 'x' | center(10**9) }}{{ 'x' * 10**9 }}{% endif %}ok")
    assert chat.render(M) == "ok" and time.perf_counter() - t0 < 1.0


def test_template_size_and_nesting():
    with pytest.raises(ChatTemplateError, match="max_template_chars"):
        ChatTemplate("x" * 2000, limits=TemplateLimits(max_template_chars=1000))
    with pytest.raises(ChatTemplateError, match="nested too deeply"):
        ChatTemplate("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")


def test_limits_of_one_render_do_not_leak_into_another():
    """Counters are per render (and per thread): a render that hits its limit in one thread does
    not disturb one running in another, and the next render starts from zero."""
    looping = ChatTemplate("{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}",
                           limits=TemplateLimits(max_loop_iterations=1000))
    fine = ChatTemplate("{% for i in range(900) %}.{% endfor %}", limits=TemplateLimits(max_loop_iterations=1000))
    errors, outputs = [], []

    def run(chat, sink, n):
        for _ in range(n):
            try:
                sink.append(chat.render(M))
            except ChatTemplateError as e:
                sink.append(e)

    threads = [threading.Thread(target=run, args=(looping, errors, 20)),
               threading.Thread(target=run, args=(fine, outputs, 20))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(e, ChatTemplateError) for e in errors) and len(errors) == 20
    assert outputs == ["." * 900] * 20


def test_limit_values_are_checked():
    for bad in ({"timeout_s": 0}, {"timeout_s": float("nan")}, {"max_calls": -1}, {"max_depth": True},
                {"max_range": 1.5}):
        with pytest.raises(InvalidParameterError, match=next(iter(bad))):
            TemplateLimits(**bad)
    with pytest.raises(InvalidParameterError, match="TemplateLimits"):
        ChatTemplate("x", limits={"timeout_s": 1})
    assert TemplateLimits(timeout_s=float("inf")).timeout_s == float("inf")


def test_ordinary_operations_still_work():
    """The hooks keep Jinja2's semantics for what real templates do."""
    source = ("{% set ns = namespace(n=0, items=[]) %}"
              "{% for m in messages if m.role != 'system' %}{% set ns.n = ns.n + 1 %}"
              "{% set ns.items = ns.items + [m.content | upper] %}{% endfor %}"
              "{{ ns.n }}|{{ ns.items | join(',') }}|{{ (messages | map(attribute='role') | list)[-1] }}|"
              "{{ '%s-%03d' % ('a', 7) }}|{{ '{0}:{1}'.format('k', 2) }}|{{ 'ab' * 2 }}|{{ [1, 2] + [3] }}|"
              "{{ {'a': 1}.items() | list }}|{{ 2 ** 10 }}|{{ 'x' ~ 1 ~ none }}|{{ range(3) | sum }}|"
              "{{ 'a b' | replace(' ', '_') }}|{{ messages | length }}|{{ 'abc' | reverse }}|"
              "{% for x in [3, 1, 2] | sort %}{{ x }}{{ ',' if not loop.last }}{% endfor %}|"
              "{% for x in 'ab' %}{{ loop.index }}/{{ loop.length }}{% endfor %}|{{ [[1, 2], [3]] | sum(start=[]) }}|"
              "{{ 'x'.ljust(3, '.') }}|{{ ('a', 'b') | join }}|{{ 'abc' | list | last }}|{{ lipsum(1, false, 5, 6) | wordcount }}")
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}]
    assert ChatTemplate(source).render(messages) == (
        "2|A,B|assistant|a-007|k:2|abab|[1, 2, 3]|[('a', 1)]|1024|x1None|3|a_b|3|cba|1,2,3|1/22/2|"
        "[1, 2, 3]|x..|ab|c|5")
