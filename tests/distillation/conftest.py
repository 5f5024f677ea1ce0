"""Fixtures shared by the distillation tests."""

from __future__ import annotations

import pytest

from conftest import corpus_text


@pytest.fixture
def corpus(tmp_path):
    """A ``.txt`` corpus of 40 paragraphs: enough rows for a few steps and a held-out split."""
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text(40) + "\n")
    return path
