"""Hostile chat templates against llama_jax/chat_template.py's sandbox, beyond the cases of
test_chat_template.py: Python internals out of reach; loops that never end; output, strings,
numbers and lists that would take gigabytes, whether built at once (one operation repeating a
long argument) or bit by bit. Each is a `TemplateError` within a second or the time limit, and
never allocates more than a bounded amount."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from llama_jax import chat_template
from llama_jax.chat_template import ChatTemplate
from llama_jax.errors import TemplateError

LONG = [{"role": "user", "content": "x" * 10_000}]


@pytest.mark.parametrize(
    "source",
    [
        "{{ raise_exception.__globals__ }}",
        "{{ strftime_now.__globals__['datetime'] }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ self._TemplateReference__context }}",
        "{{ '{0.__class__.__mro__}'.format(1) }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ range.__self__ }}",
        "{{ (messages|first).__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ loop }}{% for m in messages %}{{ loop.__class__ }}{% endfor %}",
    ],
)
def test_python_internals_stay_out_of_reach(source):
    try:
        out = ChatTemplate(source).render(LONG)
    except TemplateError as e:
        assert "unsafe" in str(e) or "undefined" in str(e).lower(), e
        return
    assert "class" not in out and "module" not in out and "function" not in out, out[:200]


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("{{ messages[0]['content'] * 999999 }}", "repetition would build"),
        ("{{ (messages * 999999) * 999999 }}", "repetition would build"),
        ("{{ messages[0]['content'] | replace('', 'y' * 999999) }}", "replace would build"),
        ("{{ messages[0]['content'].replace('x', 'y' * 999999) }}", "replace would build"),
        ("{{ range(100000) | join('y' * 999999) }}", "join would build"),
        ("{{ ('y' * 999999).join(range(10000) | map('string')) }}", "join would build"),
        ("{{ range(10000) | map('string') | join('y' * 999999) }}", "join would build"),
        ("{{ ('\\n' * 999999) | indent(999999) }}", "indent would build"),
        ("{{ ('\\n' * 999999) | indent('y' * 999999) }}", "indent would build"),
        ("{{ messages[0]['content'] | wordwrap(1, wrapstring='y' * 999999) }}", "wordwrap would build"),
        ("{{ ('\\t' * 999999).expandtabs(999999) }}", "expandtabs would build"),
        ("{{ ('%99999s' * 1000) % ((1,) * 1000) }}", "where a size is expected"),
        ("{{ ('{:99999}' * 1000).format(*range(1000)) }}", "where a size is expected"),
        ("{{ (((9 ** 64) ** 64) ** 64) ** 64 }}", "power"),
        ("{{ messages | tojson(indent=999999) }}", "indent of 999999"),
        ("{{ lipsum(999999) }}", "lipsum' is undefined"),
        (
            "{% set ns = namespace(l=[]) %}{% for i in range(3000) %}"
            "{% set ns.l = ns.l + ['x' * 999999] %}{% endfor %}{{ ns.l | length }}",
            "built more than",
        ),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
        ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "RecursionError"),
        (
            "{% set s = 'x' * 10000 %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{{ s | length }}",
            "concatenation would build",
        ),
        ("{% set s = 'x' * 999999 %}{{ s ~ s ~ s }}", "concatenation would build"),
        ("{% set l = ['x' * 999999] * 999999 %}{{ 'a' ~ l }}", "concatenation would build"),
        ("{% set l = ['x' * 999999] * 999999 %}{{ l }}", "output would build"),
        ("{% set d = {'k': ['x' * 999999] * 999999} %}{{ d }}", "output would build"),
        ("{% include 'other' %}", "no loader"),
        ("{% extends 'base' %}", "no loader"),
    ],
)
def test_amplifiers_are_refused_before_they_allocate(source, problem):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(TemplateError, match=problem):
            ChatTemplate(source).render(LONG)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 256 * 2**20, peak  # the budget is 16 M characters; a bomb would be gigabytes


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% if j %}{% endif %}{% endfor %}{% endfor %}",
        "{% for i in range(100000) recursive %}{% if loop.depth < 9 %}{{ loop(range(100000)) }}{% endif %}{% endfor %}",
        "{% for i in range(100000) %}{% for m in messages * 10 %}{% set x = m.role %}{% endfor %}{% endfor %}",
        # loops that make no call, attribute access or output: only their iterations can check
        "{% set l = range(3000) | list %}{% for a in l %}{% for b in l %}{% for c in l %}"
        "{% endfor %}{% endfor %}{% endfor %}",
        "{% set l = messages * 30000 %}{% for m in l %}{% for n in l %}{% if m is none or n %}{% endif %}"
        "{% endfor %}{% endfor %}",
    ],
)
def test_endless_loops_are_stopped_by_the_time_limit(monkeypatch, source):
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.3)
    t0 = time.perf_counter()
    with pytest.raises(TemplateError, match="too long"):
        ChatTemplate(source).render(LONG)
    assert time.perf_counter() - t0 < 2.0


def test_real_templates_still_render_long_conversations(smollm_meta):
    """The caps leave room for what real templates do with long conversations."""
    template = ChatTemplate.resolve(smollm_meta[0]["tokenizer.chat_template"])
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 1000} for i in range(100)
    ]
    assert len(template.render(messages)) > 500_000
    hf_style = (
        "{{ messages | tojson(indent=2) }}{% for m in messages %}{{ m['content'] | trim | replace('\\n', '\\\\n') }}"
        "{{ m['content'].split(' ') | join(', ') | length }}{% endfor %}"
    )
    assert ChatTemplate(hf_style).render(messages[:20])
