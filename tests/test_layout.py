"""The output layout: names from data become safe, distinct file names directly in their folder."""

from __future__ import annotations

import os
import posixpath
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from anogan_batch.job.layout import HASH_CHARS, SLUG_CHARS, JobLayout, file_stem

HOSTILE = [
    "../../x",
    "/some/dir/x",
    "../../../../tmp/x",
    "..",
    ".",
    "",
    "a\\..\\..\\b",
    "C:\\Windows\\x",
    "nul\x00byte",
    "ctrl\x01\x1f\x7f\n\r\t",
    "x" * 1500,
    "名前/スキャン",
    "\U0001f600" * 40,
    "s3://other-bucket/key",
    ".hidden",
    "-rf",
]


def test_hostile_ids_stay_in_the_overlay_folder(tmp_path):
    layout = JobLayout(str(tmp_path / "out"))
    names = set()
    for value in HOSTILE:
        path = layout.overlay(value)
        assert os.path.dirname(path) == layout.overlays, value
        assert os.path.normpath(path) == path, value
        name = os.path.basename(path)
        assert re.fullmatch(r"[A-Za-z0-9_-]+\.png", name) and not name.startswith("-."), value
        names.add(name)
    assert len(names) == len(HOSTILE)  # no two ids share a file


def test_s3_layout_keeps_the_prefix():
    layout = JobLayout("s3://bucket/jobs/j1")
    path = layout.overlay("../../../etc/passwd")
    assert posixpath.dirname(path) == "s3://bucket/jobs/j1/overlays"


def test_stem_is_readable_where_it_can_be():
    assert file_stem("lesion/scan_12").startswith("lesion_scan_12-")
    assert file_stem("lesion/scan_12") != file_stem("lesion_scan_12")
    assert file_stem("A") != file_stem("a")  # apart on case-insensitive filesystems too


@settings(max_examples=400, deadline=None)
@given(st.text(), st.text())
def test_any_text_gives_a_safe_distinct_stem(a, b):
    for value in (a, b):
        stem = file_stem(value)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", stem)
        assert len(stem) <= SLUG_CHARS + 1 + HASH_CHARS
        assert not stem.startswith(("-", "_"))
    assert (file_stem(a) == file_stem(b)) == (a == b)
