"""Staged output batches (issue 12): a batch appears in its folder whole or not at all; orphans go at start-up."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import SimpleITK as sitk

from osteonode.atomic import TMP_PREFIX, remove_orphans, staged
from osteonode.ctseries import write_ct_series
from osteonode.pipeline import OUTPUT_FILES, analyze_files


def _entry(tmp_path: Path) -> Path:
    """An outbox entry holding an earlier result set and the records that must survive a new one."""
    entry = tmp_path / "outbox" / "1.2.3"
    entry.mkdir(parents=True)
    for name, text in (("sr.dcm", "old SR"), ("key_1.dcm", "old key image"), ("result.json", "old"),
                       ("delivery-pacs.json", "record"), ("last-sent.json", "lineage"), (".lock", "")):
        (entry / name).write_text(text)
    return entry


def test_a_batch_replaces_the_earlier_outputs_at_once_and_keeps_the_records(tmp_path):
    entry = _entry(tmp_path)
    lock_inode = (entry / ".lock").stat().st_ino
    with open(entry / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with staged(entry, replaces=OUTPUT_FILES) as stage:
            assert stage.parent == entry.parent and stage.name.startswith(TMP_PREFIX)
            (stage / "sr.dcm").write_text("new SR")
            (stage / "result.json").write_text("new")
            assert (entry / "sr.dcm").read_text() == "old SR"  # nothing visible before the exchange
        with open(entry / ".lock") as other, pytest.raises(BlockingIOError):  # the held lock is the same file
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert sorted(p.name for p in entry.iterdir()) == [".lock", "delivery-pacs.json", "last-sent.json",
                                                       "result.json", "sr.dcm"]
    assert (entry / "sr.dcm").read_text() == "new SR" and (entry / "delivery-pacs.json").read_text() == "record"
    assert (entry / ".lock").stat().st_ino == lock_inode
    assert [p.name for p in entry.parent.iterdir()] == ["1.2.3"]  # no staging folder left


def test_an_error_between_write_and_rename_leaves_nothing_visible(tmp_path):
    entry = _entry(tmp_path)
    before = {p.name: p.read_bytes() for p in entry.iterdir()}
    with pytest.raises(RuntimeError), staged(entry, replaces=OUTPUT_FILES) as stage:
        (stage / "sr.dcm").write_text("new SR")
        raise RuntimeError("the encoder failed")
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before
    assert [p.name for p in entry.parent.iterdir()] == ["1.2.3"]


def test_a_crash_between_write_and_rename_leaves_an_orphan_that_start_up_removes(tmp_path):
    """The process dies (``os._exit``, as kill -9) inside the batch: the entry is unchanged, the staging folder
    with its patient data is left over and removed by :func:`remove_orphans`."""
    entry = _entry(tmp_path)
    before = {p.name: p.read_bytes() for p in entry.iterdir()}
    code = ("import os, sys; from pathlib import Path; from osteonode.atomic import staged\n"
            "with staged(Path(sys.argv[1])) as stage:\n"
            "    (stage / 'sr.dcm').write_text('half')\n"
            "    os._exit(9)\n")
    run = subprocess.run([sys.executable, "-c", code, str(entry)], env={**os.environ, "PYTHONPATH": os.pathsep.join(
        sys.path)}, check=False)
    assert run.returncode == 9
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before
    (orphan,) = (p for p in entry.parent.iterdir() if p.name.startswith(TMP_PREFIX))
    (entry / ".tmp-0a1b").write_bytes(b"half a delivery record")  # an orphan file of write_atomic too
    assert remove_orphans(entry.parent) == 2
    assert not orphan.exists() and not (entry / ".tmp-0a1b").exists()
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before


def test_a_reader_sees_each_batch_whole_or_not_at_all(tmp_path):
    """A reader listing the folder while batches of two files are put in place never sees one without the
    other.

    Listings during which the folder was swapped are left out: such a reader was reading the superseded
    version, whose files vanish one by one as it is deleted (it must list again, as a retried delivery does).
    Without the atomic exchange (files renamed one by one) the folder is never swapped, and this test fails.
    """
    entry = _entry(tmp_path)
    seen, done = [], threading.Event()

    def reader() -> None:
        while not done.is_set():
            before = os.stat(entry).st_ino
            names = set(os.listdir(entry))
            if os.stat(entry).st_ino == before:
                seen.append(("a.dcm" in names, "b.dcm" in names))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(150):
            with staged(entry, replaces=["a.dcm", "b.dcm"]) as stage:
                if i % 2 == 0:
                    (stage / "a.dcm").write_text(str(i))
                    (stage / "b.dcm").write_text(str(i))
    finally:
        done.set()
        thread.join()
    assert len(seen) > 100
    assert {pair for pair in seen} <= {(True, True), (False, False)}


def test_a_folder_that_cannot_be_exchanged_still_gets_complete_files(tmp_path):
    """A folder with a subfolder (e.g. a user's ``analyze --out``) gets the files renamed one by one."""
    entry = _entry(tmp_path)
    (entry / "notes").mkdir()
    with staged(entry, replaces=OUTPUT_FILES) as stage:
        (stage / "sr.dcm").write_text("new SR")
    assert (entry / "sr.dcm").read_text() == "new SR" and not (entry / "key_1.dcm").exists()
    assert (entry / "notes").is_dir() and (entry / "delivery-pacs.json").is_file()
    assert [p.name for p in entry.parent.iterdir()] == ["1.2.3"]


def _tiny_series(folder: Path) -> list[Path]:
    image = sitk.Image([32, 32, 3], sitk.sitkInt16)
    image.SetSpacing((1.0, 1.0, 3.0))
    return write_ct_series(image, folder)


def test_the_pipeline_puts_each_batch_in_place_whole(tmp_path, monkeypatch):
    """A failure while the follow-up batch (PDF) is made leaves the SR batch in place and nothing of the
    follow-up; each published batch is complete in the folder when ``publish`` sees it."""
    files, out = _tiny_series(tmp_path / "ct"), tmp_path / "outbox" / "study"
    published = []

    def publish(result, paths):
        assert all(p.is_file() for p in paths) and (out / "result.json").is_file()
        published.append(sorted(p.name for p in paths))

    assert analyze_files(files, out, publish=publish).status == "not_evaluable"
    assert published == [["sr.dcm"], ["report.dcm"]]

    def broken(*args, **kwargs):
        raise MemoryError("while rendering the PDF")

    monkeypatch.setattr("osteonode.pipeline.build_pdf_report", broken)
    (out / "sr.dcm").write_bytes(b"the SR of an earlier analysis")
    with pytest.raises(MemoryError):
        analyze_files(files, out)
    assert sorted(p.name for p in out.iterdir()) == ["result.json", "sr.dcm"]  # the earlier PDF went with its SR
    assert (out / "sr.dcm").read_bytes()[128:132] == b"DICM"
    assert [p.name for p in out.parent.iterdir()] == ["study"]
