"""The repository's copies of the webui-written reference files are the reference files."""

import filecmp
import os

import pytest
from helpers import A1111, SHARED_A1111


def test_the_copied_webui_files_equal_the_reference_folder():
    if not os.path.isdir(SHARED_A1111):
        pytest.skip(f"{SHARED_A1111} is not beside this checkout; the copies in {A1111} are used as they are")
    reference = sorted(os.listdir(SHARED_A1111))
    assert sorted(os.listdir(A1111)) == reference, "copy the reference again: cp ../shared/a1111/* tests/data/a1111/"
    for name in reference:
        assert filecmp.cmp(os.path.join(SHARED_A1111, name), os.path.join(A1111, name), shallow=False), name
