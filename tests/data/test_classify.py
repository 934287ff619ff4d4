"""Tests for build_llm.data.classify: the labeled CSV reader and its errors."""

from __future__ import annotations

import pytest

from build_llm.data.classify import read_labeled_csv


def test_read_labeled_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,extra\nhello there,a,1\n\"with, comma\",b,2\n")
    assert read_labeled_csv(path, "text", "label") == (["hello there", "with, comma"], ["a", "b"])
    with pytest.raises(ValueError, match=r"--text-column 'body' is not a column .* \['text', 'label', 'extra'\]"):
        read_labeled_csv(path, "body", "label")
    path.write_text("text,label\nhello,\n")
    with pytest.raises(ValueError, match="row 2: empty text or label"):
        read_labeled_csv(path, "text", "label")
    path.write_text("text,label\n")
    with pytest.raises(ValueError, match="has no rows"):
        read_labeled_csv(path, "text", "label")
