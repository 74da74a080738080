"""files.atomic_path: the one way a file is written. A write that fails leaves the old file and no
temporary behind; one that succeeds replaces it whole; writers that read the extension still see it."""

import pytest

from craftvla.files import atomic_path, write_json_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"a": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_write_replaces_the_file_and_keeps_the_suffix_for_the_writer(tmp_path):
    path = tmp_path / "sub" / "plot.png"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".") and tmp.suffix == ".png"
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and not tmp.exists()
