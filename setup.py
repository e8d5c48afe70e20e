"""Build hook: setuptools reads the project from pyproject.toml; this file adds the cffi extension
`lmengine.kernels._native` (the C kernels of kernels/csrc/, see kernels/build_native.py)."""
from setuptools import setup

setup(cffi_modules=["kernels/build_native.py:ffibuilder"])
