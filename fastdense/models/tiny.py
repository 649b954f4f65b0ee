"""Moved: the tiny test pipeline lives in :mod:`fastdense.testing` (test-model builders are not
model loaders); these names stay importable from here."""

from fastdense.testing import TINY_HIDDEN, TINY_MAX_LENGTH, build_tiny_pipeline, tiny_vocab_and_merges

__all__ = ["TINY_HIDDEN", "TINY_MAX_LENGTH", "build_tiny_pipeline", "tiny_vocab_and_merges"]
