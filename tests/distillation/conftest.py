"""Fixtures shared by the distillation tests."""

from __future__ import annotations

import pytest
import torch

from conftest import corpus_text


@pytest.fixture
def corpus(tmp_path):
    """A ``.txt`` corpus of 40 paragraphs: enough rows for a few steps and a held-out split."""
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text(40) + "\n")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on 2 shared cores run much faster on one thread (no OpenMP barrier waits):
    a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
