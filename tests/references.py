"""The reference outputs beside the repository (../shared/reference/: llama.cpp and transformers
outputs for the bundled model, zen.txt and its quality figures)."""
import os

import pytest

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "reference")


def reference_file(name: str) -> str:
    """Path of ../shared/reference/NAME; fails the test (naming the path) when it is missing."""
    path = os.path.normpath(os.path.join(REFERENCE_DIR, name))
    if not os.path.exists(path):
        pytest.fail(f"reference file {path} is missing (../shared/reference beside the repository)")
    return path
