"""Kernel tests run on CPU under the triton interpreter when CUDA is absent.

TRITON_INTERPRET must be set before triton is first imported, so it is set here,
at conftest import, and nothing in this folder imports triton at module level
before this file runs.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
