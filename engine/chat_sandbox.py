"""Running an untrusted chat template under limits.

A chat template is code from a model file. Jinja2's `ImmutableSandboxedEnvironment` keeps it away
from Python's internals and from mutating its inputs, but not from using up the machine: nested
`range(100000)` loops run for hours, `'x' * 10**9` builds a gigabyte, a macro calling itself
overflows the stack. Here every render runs under `TemplateLimits` (defaults in brackets):

- time: `timeout_s` [5 s] of wall-clock time per render. The clock is read at every loop
  iteration, call, operator, filter and write, so a tight loop inside the template stops too. (No
  thread or signal is involved; one single operation is bounded by the size limits below.)
- loops: at most `max_loop_iterations` [1,000,000] for-loop iterations in all (nested loops
  multiply, so this is what stops them). A filter that turns a lazy sequence into a list (`list`,
  `sort`, `join`, `batch`...) counts its items as iterations too. `range()` gives at most
  `max_range` [100,000] items.
- calls: at most `max_calls` [1,000,000] calls (macros, methods, functions) in all, nested at most
  `max_depth` [64] deep (a macro calling itself).
- size: a value the template builds - with `+`, `*`, `%`, `~`, a list or dict literal, a filter or
  a call - has a size of at most `max_value_size` [4,000,000]. The size of a string is its length;
  of a list or dict, about the length of its printed form (so a list holding the same big list
  twice counts it twice). Where the size is known beforehand the value is not built
  (`'x' * 10**9`, `s.ljust(10**9)`, `'%1000000000s' % x`, `s | indent(10**9)`); otherwise the
  result is measured - an operation that grows its input by a bounded factor (`escape`, `upper`,
  `tojson` escaping) may briefly build a few times the limit before it is refused. Integers have
  at most MAX_INT_BITS bits (`2 ** 10**9` is refused before it is computed).
- output: at most `max_output_chars` [16,000,000] characters written in all - everything the
  template writes, including text captured by `{% set %}...{% endset %}`, macros and filter blocks.
- source: at most `max_template_chars` [1,000,000] characters of template text.

A template that passes a limit raises `LimitExceeded` naming the limit (ChatTemplate turns it into
a ChatTemplateError). The defaults are far above what real templates need: a 1,000-message
conversation renders with a few thousand iterations and calls (tests/engine/test_chat_limits.py
renders the templates of SmolLM2, Llama 3.1, Qwen 2.5, Mistral and Gemma under them).

How: the template is parsed into a Jinja2 syntax tree, which is instrumented before it is
compiled (`_Instrument`): every for-loop's iterable is wrapped in a counting iterator, every
written value passes through a counter, `~` and list/tuple/dict literals through a size check.
The environment (`LimitedSandbox`, a subclass of the immutable sandbox) intercepts the operators
`+ * % **` (`call_binop`) and every call (`call`), and wraps every filter with size checks. No
template code runs while compiling: constant folding is off and the wrapped filters take the
render context, which does not exist at compile time. The counters of one render live in a
`_Budget`, found through a context variable, so renders in several threads do not mix.
"""
from __future__ import annotations

import operator
import re
import time
from collections import deque
from collections.abc import Mapping, Set, ValuesView
from contextvars import ContextVar
from dataclasses import dataclass, fields

import jinja2
from jinja2 import nodes
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

from .errors import InvalidParameterError

MAX_INT_BITS = 1 << 16          # an integer the template computes has at most this many bits
_SCALAR_SIZE = 8                # size of a value that is not a string, number or container


@dataclass(frozen=True)
class TemplateLimits:
    """What one render of a chat template may use (see the module docstring for each limit).

    `ChatTemplate(source, limits=TemplateLimits(timeout_s=1.0))` sets them for one template;
    `chat_template.limits = ...` changes them later.
    """

    timeout_s: float = 5.0
    max_output_chars: int = 16_000_000
    max_value_size: int = 4_000_000
    max_loop_iterations: int = 1_000_000
    max_calls: int = 1_000_000
    max_depth: int = 64
    max_range: int = 100_000
    max_template_chars: int = 1_000_000

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            number = (int, float) if f.name == "timeout_s" else int
            if isinstance(value, bool) or not isinstance(value, number) or not value > 0:
                kind = "number" if f.name == "timeout_s" else "integer"
                raise InvalidParameterError(f"TemplateLimits.{f.name} must be a positive {kind}, got {value!r}")


class LimitExceeded(Exception):
    """A template passed one of its TemplateLimits. `limit` names the field.

    Deliberately not a ValueError: filters that catch ValueError (`int`, `float`) cannot swallow it.
    """

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


# -- the counters of one render ------------------------------------------------------------------
class _Budget:
    """Counters of one render, checked against its TemplateLimits, and the sizes of the values
    already measured (large immutable containers are measured once)."""

    def __init__(self, limits: TemplateLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s
        self.iterations = 0
        self.calls = 0
        self.depth = 0
        self.written = 0
        self._sizes: dict[int, tuple] = {}   # id -> (container, size, depth): keeps the container alive

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded("timeout_s", f"rendering took longer than {self.limits.timeout_s:g} s")

    def iteration(self) -> None:
        self.iterations += 1
        if self.iterations > self.limits.max_loop_iterations:
            raise LimitExceeded("max_loop_iterations",
                                f"more than {self.limits.max_loop_iterations:,} loop iterations")
        self.tick()

    def enter_call(self) -> None:
        self.calls += 1
        if self.calls > self.limits.max_calls:
            raise LimitExceeded("max_calls", f"more than {self.limits.max_calls:,} calls")
        if self.depth >= self.limits.max_depth:
            raise LimitExceeded("max_depth", f"calls nested more than {self.limits.max_depth} deep "
                                             f"(a macro that calls itself without end?)")
        self.depth += 1
        self.tick()

    def write(self, n_chars: int) -> None:
        self.written += n_chars
        if self.written > self.limits.max_output_chars:
            raise LimitExceeded("max_output_chars",
                                f"the template wrote more than {self.limits.max_output_chars:,} characters")
        self.tick()

    def need(self, size: int, what: str) -> None:
        """Refuse to build `what` when its size would pass max_value_size."""
        if size > self.limits.max_value_size:
            raise LimitExceeded("max_value_size", f"{what} would have a size of about {size:,} "
                                                  f"(limit {self.limits.max_value_size:,})")

    def check(self, value, what: str) -> None:
        """Refuse `value` (already built) when its size passes max_value_size."""
        self.need(self.size(value), what)
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise LimitExceeded("max_value_size", f"{what} is an integer of {value.bit_length():,} bits "
                                                  f"(limit {MAX_INT_BITS:,})")

    def size(self, value) -> int:
        if type(value) is str:                    # the common case, first
            return len(value)
        return self.measure(value)[0]

    def measure(self, value) -> tuple[int, int]:
        """(size, nesting depth) of value; counting stops a little past max_value_size."""
        size, depth, _ = self._measure(value, self.limits.max_value_size, set())
        return size, depth

    def _measure(self, value, budget: int, open_ids: set) -> tuple[int, int, bool]:
        """(size, depth, stable): stable is False when a mutable Namespace is inside."""
        if isinstance(value, (str, bytes, bytearray)):
            return len(value), 0, True
        if isinstance(value, bool) or value is None:
            return 5, 0, True
        if isinstance(value, int):
            return value.bit_length() // 3 + 1, 0, True     # >= its number of decimal digits
        if isinstance(value, range):
            try:
                return _SCALAR_SIZE * len(value), 1, True
            except OverflowError:
                return 1 << 62, 1, True
        if isinstance(value, Namespace):
            children, pairs, stable = value._Namespace__attrs.items(), True, False
        elif isinstance(value, Mapping):
            children, pairs, stable = value.items(), True, True
        elif isinstance(value, (list, tuple, Set, ValuesView, deque)):
            children, pairs, stable = value, False, True
        else:
            return _SCALAR_SIZE, 0, True
        key = id(value)
        known = self._sizes.get(key)
        if known is not None:
            return known[1], known[2], True
        if key in open_ids:                       # a cycle: printed as [...]
            return 5, 0, stable
        open_ids.add(key)
        size, depth = 2, 0
        for child in children:
            if pairs:
                k_size, k_depth, k_stable = self._measure(child[0], budget - size, open_ids)
                v_size, v_depth, v_stable = self._measure(child[1], budget - size, open_ids)
                c_size, c_depth, c_stable = k_size + v_size + 2, max(k_depth, v_depth), k_stable and v_stable
            else:
                c_size, c_depth, c_stable = self._measure(child, budget - size, open_ids)
            size += c_size + 2
            depth = max(depth, c_depth + 1)
            stable = stable and c_stable
            if size > budget:
                break
        open_ids.discard(key)
        if stable and size >= 256 and size <= budget and isinstance(value, (list, tuple, dict, frozenset)):
            self._sizes[key] = (value, size, depth)
        return size, depth, stable


_ACTIVE: ContextVar[_Budget | None] = ContextVar("lmengine_template_budget", default=None)


def _budget() -> _Budget:
    budget = _ACTIVE.get()
    if budget is None:
        raise RuntimeError("a template compiled by LimitedSandbox must be rendered with render_limited()")
    return budget


def render_limited(template: jinja2.Template, variables: dict, limits: TemplateLimits) -> str:
    """template.render(variables) under `limits`; LimitExceeded when it passes one."""
    token = _ACTIVE.set(_Budget(limits))
    try:
        return template.render(variables)
    finally:
        _ACTIVE.reset(token)


# -- hooks the instrumented template calls -------------------------------------------------------
class _Counted:
    """An iterable whose iteration counts against max_loop_iterations (len() passes through)."""

    def __init__(self, budget: _Budget, iterable):
        self._budget, self._iterable = budget, iterable

    def __iter__(self):
        budget = self._budget
        for item in self._iterable:
            budget.iteration()
            yield item

    def __len__(self):
        return len(self._iterable)


def _hook_loop(iterable):
    """`{% for x in iterable %}`: iterable, counted."""
    budget = _budget()
    budget.tick()
    return _Counted(budget, iterable)


def _hook_write(value):
    """`{{ value }}` and template text: the text, counted against max_output_chars."""
    budget = _budget()
    if type(value) is not str:
        budget.check(value, "a written value")
        value = str(value)
    budget.write(len(value))
    return value


def _hook_concat(*parts):
    """`a ~ b ~ c`: the concatenation, refused before it is built when too large."""
    budget = _budget()
    budget.tick()
    texts = []
    for part in parts:
        if not isinstance(part, str):
            budget.check(part, "an operand of ~")
            part = str(part)
        texts.append(part)
    budget.need(sum(map(len, texts)), "a ~ concatenation")
    return "".join(texts)


def _hook_literal(value):
    """A list, tuple or dict literal: checked (it may hold the same big value many times)."""
    budget = _budget()
    budget.tick()
    budget.check(value, "a list, tuple or dict literal")
    return value


_HOOKS = {"lme_loop": _hook_loop, "lme_write": _hook_write, "lme_concat": _hook_concat,
          "lme_literal": _hook_literal}


def _range(*args):
    """The template's range(): at most max_range items."""
    budget = _budget()
    budget.tick()
    items = range(*args)
    try:
        n = len(items)
    except OverflowError:
        n = None
    if n is None or n > budget.limits.max_range:
        shown = f"{n:,}" if n is not None else "more than 2**63"
        raise LimitExceeded("max_range", f"range() of {shown} items (limit {budget.limits.max_range:,})")
    return items


def _lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 (Jinja2's parameter names)
    budget = _budget()
    budget.need(operator.index(n) * operator.index(max) * 16, "lipsum()")
    return generate_lorem_ipsum(n, html, min, max)


# -- size estimates: operators, str methods, filters ---------------------------------------------
def _format_size(budget: _Budget, fmt: str, values) -> int:
    """Upper bound of the length of `fmt % values` / `fmt.format(*values)`.

    Every field may print the largest value padded to the largest width written in the format
    (or given as an argument, for `*` and nested `{}` widths).
    """
    widest = 0
    for m in re.finditer(r"\d+", fmt):
        digits = m.group()
        width = int(digits) if len(digits) <= 20 else 10 ** 20
        budget.need(width, f"the width or precision {digits[:30]} in a format string")
        widest = max(widest, width)
    values = list(values)
    if "*" in fmt or re.search(r"\{[^{}]*\{", fmt):
        widest = max([widest] + [abs(v) for v in values if isinstance(v, int)])
    biggest = max((budget.size(v) for v in values), default=0)
    n_fields = fmt.count("%") + fmt.count("{")
    return len(fmt) + n_fields * (biggest + widest)


def _format_values(right) -> list:
    if isinstance(right, tuple):
        return list(right)
    if isinstance(right, Mapping):
        return list(right.values())
    return [right]


def _binop_size(budget: _Budget, op: str, left, right) -> tuple[int, str] | None:
    """(size of the result, what) for sequence results of + * %; None when not a sequence."""
    sequences = (str, bytes, list, tuple)
    if op == "+" and isinstance(left, sequences) and isinstance(right, sequences):
        return budget.size(left) + budget.size(right), "the result of +"
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, sequences) and isinstance(n, int):
                return budget.size(seq) * max(n, 0), "the result of *"
    if op == "%" and isinstance(left, (str, bytes)):
        fmt = left if isinstance(left, str) else left.decode("latin-1")
        return _format_size(budget, fmt, _format_values(right)), "the result of %"
    return None


def _check_power(budget: _Budget, base, exponent) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        bits = base.bit_length() * exponent
        if bits > MAX_INT_BITS:
            raise LimitExceeded("max_value_size", f"** would give an integer of about {bits:,} bits "
                                                  f"(limit {MAX_INT_BITS:,})")


# str (and bytes) methods that can make a string much longer than their inputs. Each returns the
# size of the result; an error in here means the call itself fails (it is then made, and raises).
def _str_width(budget, s, args, kwargs):             # ljust rjust center zfill
    return max(len(s), operator.index(args[0]))


def _str_expandtabs(budget, s, args, kwargs):
    tabsize = args[0] if args else kwargs.get("tabsize", 8)
    tab = "\t" if isinstance(s, str) else b"\t"
    return len(s) + s.count(tab) * max(operator.index(tabsize), 0)


def _str_replace(budget, s, args, kwargs):
    old, new = args[0], args[1]
    count = operator.index(args[2]) if len(args) > 2 else -1
    n = s.count(old) if len(old) else len(s) + 1
    if count >= 0:
        n = min(n, count)
    return len(s) + n * max(len(new) - len(old), 0)


def _str_join(budget, s, args, kwargs):             # args[0] is already a list (see _check_call)
    items = args[0]
    total = sum(len(x) for x in items if isinstance(x, (str, bytes)))
    return total + len(s) * max(len(items) - 1, 0)


def _str_format(budget, s, args, kwargs):
    return _format_size(budget, s, list(args) + list(kwargs.values()))


def _str_format_map(budget, s, args, kwargs):
    return _format_size(budget, s, _format_values(args[0]))


def _str_translate(budget, s, args, kwargs):
    table = args[0]
    longest = 1
    if isinstance(table, Mapping):
        longest = max([1] + [len(v) for v in table.values() if isinstance(v, (str, bytes))])
    return len(s) * longest


_STR_METHODS = {"ljust": _str_width, "rjust": _str_width, "center": _str_width, "zfill": _str_width,
                "expandtabs": _str_expandtabs, "replace": _str_replace, "join": _str_join,
                "format": _str_format, "format_map": _str_format_map, "translate": _str_translate}


def _items(budget: _Budget, value):
    """value as a list or tuple; a lazy iterable (or a string, or a dict) is drawn item by item,
    each item counted as a loop iteration."""
    if isinstance(value, (list, tuple)):
        return value
    return list(_Counted(budget, value))


def _count(x) -> int:
    """An integer argument of a filter, for an estimate (TypeError when it is not a number)."""
    if isinstance(x, float):
        return int(x) if x == x and abs(x) != float("inf") else 0
    return operator.index(x)


# Filters. An estimate takes the filter's own arguments (without its context or environment) and
# returns the size of the result. Filters in _MATERIALIZED first get a lazy iterable as a list,
# drawn (and counted) by the wrapper. An error in an estimate means the arguments are wrong for
# the filter too: it is then called, and raises its own error.
def _f_center(b, value, width=80):
    return max(b.size(value), _count(width))


def _f_indent(b, s, width=4, first=False, blank=False):
    w = len(width) if isinstance(width, str) else _count(width)
    lines = s.count("\n") + 1 if isinstance(s, str) else b.size(s)
    return b.size(s) + lines * max(w, 0)


def _f_format(b, value, *args, **kwargs):
    return _format_size(b, str(value), list(args) + list(kwargs.values()))


def _f_join(b, items, d="", attribute=None):
    return sum(b.size(x) for x in items) + len(items) * len(str(d))


def _f_replace(b, s, old, new, count=None):
    s_, old_, new_ = str(s), str(old), str(new)
    n = s_.count(old_) if old_ else len(s_) + 1
    if count is not None:
        n = min(n, max(_count(count), 0))
    return len(s_) + n * max(len(new_) - len(old_), 0)


def _f_batch(b, items, linecount, fill_with=None):
    return 2 * b.size(items) + max(_count(linecount), 0) * (b.size(fill_with) + 2)


def _f_slice(b, items, slices, fill_with=None):
    return 2 * b.size(items) + max(_count(slices), 0) * (b.size(fill_with) + 4)


def _f_sum(b, items, attribute=None, start=0):
    return 0 if isinstance(start, (int, float, complex)) else b.size(start) + b.size(items)


def _f_size(b, items, *args, **kwargs):            # list sort unique min max groupby last
    return b.size(items)


def _nested_size(b, value, per_element: int) -> int:
    """Printed size of value when every element costs per_element more characters."""
    size, depth = b.measure(value)
    is_container = isinstance(value, (Mapping, list, tuple, Set, Namespace))
    return size + (size // 2 if is_container else 0) * (per_element + depth)


def _f_tojson(b, value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    w = len(indent) if isinstance(indent, str) else _count(indent) if indent is not None else 0
    sep = sum(len(str(x)) for x in separators) if separators else 2
    return _nested_size(b, value, 1 + sep + max(w, 0) * (b.measure(value)[1] + 1))


def _f_pprint(b, value):
    return _nested_size(b, value, 2)


def _f_wordwrap(b, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
    n = b.size(s)
    ws = len(wrapstring) if isinstance(wrapstring, str) else 1
    return n + (n + 1) * ws


def _f_urlize(b, value, trim_url_limit=None, nofollow=False, target=None, rel=None, extra_schemes=None):
    s = str(value)
    n_urls = s.count(".") + s.count("@") + s.count(":") + 1
    extra = 64 + len(str(target or "")) + len(str(rel or ""))
    return 3 * len(s) + n_urls * extra


_FILTER_ESTIMATES = {
    "center": _f_center, "indent": _f_indent, "format": _f_format, "join": _f_join,
    "replace": _f_replace, "batch": _f_batch, "slice": _f_slice, "sum": _f_sum,
    "tojson": _f_tojson, "pprint": _f_pprint, "wordwrap": _f_wordwrap, "urlize": _f_urlize,
    "list": _f_size, "sort": _f_size, "unique": _f_size, "min": _f_size, "max": _f_size,
    "groupby": _f_size, "last": _f_size,
}
# Filters that draw their whole input: they get it as a list (a lazy input drawn item by item,
# counted), so a generator of unknown length cannot fill the memory inside one call.
_MATERIALIZED = frozenset({"join", "batch", "slice", "sum", "list", "sort", "unique", "min", "max",
                           "groupby", "last"})


def _guard_filter(name: str, func):
    """The filter `func`, checked: deadline, size estimate before, size of the result after.

    The wrapper takes the render context (jinja2.pass_context), so Jinja2 never runs it while
    compiling, and hands `func` what it asked for (context, eval context or environment).
    """
    pass_arg = getattr(getattr(func, "jinja_pass_arg", None), "name", None)
    estimate = _FILTER_ESTIMATES.get(name)
    materialized = name in _MATERIALIZED

    @jinja2.pass_context
    def guarded(context, value, *args, **kwargs):
        budget = _budget()
        budget.tick()
        if materialized:
            value = _items(budget, value)      # an error here is the filter's own (not iterable...)
        if estimate is not None:
            try:
                size = estimate(budget, value, *args, **kwargs)
            except (TypeError, ValueError, AttributeError, IndexError, OverflowError):
                size = 0                       # arguments the filter itself rejects
            budget.need(size, f"the result of the {name!r} filter")
        if name == "sum":
            value = _Counted(budget, value)    # sum() adds item by item: the clock is read in between
        if pass_arg == "context":
            result = func(context, value, *args, **kwargs)
        elif pass_arg == "eval_context":
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg == "environment":
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        budget.check(result, f"the result of the {name!r} filter")
        return result

    guarded.__name__ = guarded.__qualname__ = f"guarded_{name}"
    return guarded


# -- the environment ------------------------------------------------------------------------------
class LimitedSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, instrumented for TemplateLimits (see the module docstring).

    `filters` and `globals` are added to Jinja2's own; every filter is wrapped with size checks.
    Compile with `compile_limited`, render with `render_limited`.
    """

    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def __init__(self, *, filters: dict | None = None, globals: dict | None = None, **options):
        super().__init__(optimized=False, **options)
        self.filters.update(filters or {})
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.globals.update(globals or {})
        self.globals["range"] = _range
        self.globals["lipsum"] = _lipsum
        for name, hook in _HOOKS.items():
            setattr(self, name, hook)

    def compile_limited(self, source: str, limits: TemplateLimits) -> tuple[jinja2.Template, frozenset]:
        """(compiled template, the string literals in its source but subscript keys such as the
        'role' of message['role']). TemplateSyntaxError when it does not parse; LimitExceeded when it is longer than limits.max_template_chars."""
        if len(source) > limits.max_template_chars:
            raise LimitExceeded("max_template_chars", f"the template has {len(source):,} characters "
                                                      f"(limit {limits.max_template_chars:,})")
        tree = self.parse(source)
        keys = {id(n.arg) for n in tree.find_all(nodes.Getitem)}        # message['role']: a key
        literals = frozenset(n.value for n in tree.find_all(nodes.Const)
                             if isinstance(n.value, str) and id(n) not in keys)
        tree = _Instrument().visit(tree)
        tree.set_environment(self)
        return self.from_string(tree), literals

    def call_binop(self, context, operator: str, left, right):
        budget = _budget()
        budget.tick()
        if type(left) is str and type(right) is str:       # the common case: text + text
            if operator == "+":
                budget.need(len(left) + len(right), "the result of +")
                return left + right
            if operator == "%":
                budget.need(_format_size(budget, left, [right]), "the result of %")
                return left % right
        if operator == "**":
            _check_power(budget, left, right)
        else:
            estimate = _binop_size(budget, operator, left, right)
            if estimate is not None:
                budget.need(*estimate)
        result = self.binop_table[operator](left, right)
        if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
            raise LimitExceeded("max_value_size", f"{operator} gave an integer of {result.bit_length():,} bits "
                                                  f"(limit {MAX_INT_BITS:,})")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja2's signature)
        if __obj is _hook_write or __obj is _hook_loop or __obj is _hook_concat or __obj is _hook_literal:
            return __obj(*args)                # ours (any _loop_vars/_block_vars keywords dropped)
        budget = _budget()
        budget.enter_call()
        try:
            if isinstance(__obj, LoopContext) and args:      # loop(children) in a recursive for-loop
                args = (_Counted(budget, args[0]),) + args[1:]
            args = _check_call(budget, __obj, args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        budget.check(result, f"the result of {getattr(__obj, '__name__', type(__obj).__name__)}()")
        return result


def _check_call(budget: _Budget, obj, args: tuple, kwargs: dict) -> tuple:
    """Size estimate of a call to a str/bytes method that can grow a string; the args to use
    (str.join gets its iterable as a list, drawn and counted here)."""
    target = getattr(obj, "__wrapped__", obj)      # the sandbox wraps str.format
    owner = getattr(target, "__self__", None)
    if not isinstance(owner, (str, bytes)):
        return args
    name = getattr(target, "__name__", "")
    estimate = _STR_METHODS.get(name)
    if estimate is None:
        return args
    if name == "join" and len(args) == 1:
        args = (_items(budget, args[0]),)
    user_kwargs = {k: v for k, v in kwargs.items() if k not in ("_loop_vars", "_block_vars")}
    try:
        size = estimate(budget, owner, args, user_kwargs)
    except (TypeError, ValueError, AttributeError, IndexError, OverflowError):
        return args                                # bad arguments: the call raises its own error
    budget.need(size, f"the result of {type(owner).__name__}.{name}()")
    return args


# -- instrumenting the syntax tree ---------------------------------------------------------------
def _hook_call(name: str, *args: nodes.Expr) -> nodes.Call:
    """Syntax for `environment.<name>(*args)`."""
    call = nodes.Call(nodes.EnvironmentAttribute(name), list(args), [], None, None)
    return call.set_lineno(args[0].lineno if args and args[0].lineno else 1)


class _Instrument(NodeTransformer):
    """Routes loops, writes, `~` and container literals through the hooks above."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _hook_call("lme_loop", node.iter)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [_hook_call("lme_write", child) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _hook_call("lme_concat", *node.nodes)

    def _literal(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        return _hook_call("lme_literal", node)

    visit_List = visit_Dict = _literal

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        if node.ctx != "load":             # an assignment target: a, b = ...
            self.generic_visit(node)
            return node
        return self._literal(node)
