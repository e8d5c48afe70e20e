"""docs/api.md is generated from the docstrings (docs/make_api.py) and must be up to date; every
public class and method has a docstring."""
import os
import runpy

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def test_api_reference_is_up_to_date():
    make_api = runpy.run_path(os.path.join(DOCS, "make_api.py"))
    text = make_api["render"]()
    with open(os.path.join(DOCS, "api.md"), encoding="utf-8") as f:
        assert f.read() == text, "docs/api.md is out of date: run `python docs/make_api.py`"
    assert "(no docstring)" not in text, [line for line in text.splitlines() if "no docstring" in line][:1]
