"""The scoring output's commit protocol on a local disk: parts under a run prefix, one
manifest last, readers trust only the newest manifest, collection after a newer commit."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from driftloop.outputs import (
    MANIFESTS,
    MARKER,
    ORPHAN_GRACE,
    RUNS,
    OutputError,
    ScoringOutput,
    current_manifest,
    part_name,
    read_predictions,
    read_quarantine,
)


def _run(out: Path, ids: range, *, version: int = 1, partition: str = "00000", commit: bool = True) -> str:
    output = ScoringOutput(str(out))
    output.claim()
    run = output.start_run()
    rows = list(ids)
    half = len(rows) // 2
    for index, chunk in enumerate((rows[:half], rows[half:])):
        run.write_part(pl.DataFrame({"id": chunk, "model_version": [version] * len(chunk)}), partition=partition, index=index)
    run.write_part(pl.DataFrame({"id": [-1]}), partition=partition, index=0, quarantine=True)
    if commit:
        run.commit(model_name="loans", model_version=version, input_uri="s3://key:secret@bucket/in.csv",
                   rows_in=len(rows) + 1, rows_scored=len(rows), rows_quarantined=1)
    return run.run_id


def test_the_newest_manifest_is_the_output_and_superseded_runs_are_collected(tmp_path: Path) -> None:
    out = tmp_path / "predictions"
    first = _run(out, range(10))
    assert read_predictions(str(out))["id"].to_list() == list(range(10))
    second = _run(out, range(100, 130), version=2)
    assert read_predictions(str(out))["id"].to_list() == list(range(100, 130))
    assert read_quarantine(str(out))["id"].to_list() == [-1]
    manifest = current_manifest(str(out))
    assert manifest is not None and manifest.run_id == second and manifest.model_version == 2
    assert manifest.input_uri == "s3://key:***@bucket/in.csv"  # no credential in the manifest
    assert [p.rows for p in manifest.parts] == [15, 15] and all(len(p.sha256) == 64 for p in manifest.parts)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, MANIFESTS, RUNS]
    assert [p.name for p in (out / RUNS).iterdir()] == [second] and first != second
    assert len(list((out / MANIFESTS).iterdir())) == 1


def test_a_missing_or_changed_part_is_an_error_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "predictions"
    run = _run(out, range(10))
    part = out / RUNS / run / part_name("00000", 1)
    data = part.read_bytes()
    part.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(OutputError, match=rf"lists part {RUNS}/{run}/part-00000-00001.parquet, which has sha256 .* score its input again"):
        read_predictions(str(out))
    part.unlink()
    with pytest.raises(OutputError, match=r"part-00000-00001.parquet, which is missing"):
        read_predictions(str(out))


def test_nothing_is_committed_until_the_manifest_and_crashed_runs_wait_for_the_grace(tmp_path: Path) -> None:
    out = tmp_path / "predictions"
    with pytest.raises(OutputError, match="not a committed scoring output"):
        read_predictions(str(out))
    done = _run(out, range(10))
    crashed = _run(out, range(50, 60), commit=False)  # parts written, no manifest: as after kill -9
    assert read_predictions(str(out))["id"].to_list() == list(range(10))
    output = ScoringOutput(str(out))
    assert output.collect_garbage() == []  # young: it may be a run in progress
    later = datetime.now(UTC) + ORPHAN_GRACE + timedelta(minutes=1)
    assert output.collect_garbage(now=later, apply=False) == [f"{RUNS}/{crashed}"]
    assert output.collect_garbage(now=later) == [f"{RUNS}/{crashed}"]
    assert [p.name for p in (out / RUNS).iterdir()] == [done]


def test_a_run_in_progress_survives_another_runs_commit(tmp_path: Path) -> None:
    out = tmp_path / "predictions"
    _run(out, range(5))
    output = ScoringOutput(str(out))
    slow = output.start_run()
    slow.write_part(pl.DataFrame({"id": [7, 8]}), partition="00000", index=0)
    fast = _run(out, range(20, 30))  # commits and collects while the slow run is writing
    assert read_predictions(str(out))["id"].to_list() == list(range(20, 30))
    slow.commit(model_name="loans", model_version=1, input_uri="x", rows_in=2, rows_scored=2, rows_quarantined=0)
    assert read_predictions(str(out))["id"].to_list() == [7, 8]  # the later commit wins, whole
    assert [p.name for p in (out / RUNS).iterdir()] == [slow.run_id] and fast != slow.run_id


def test_a_commit_whose_parts_are_not_all_there_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "predictions"
    _run(out, range(4))
    output = ScoringOutput(str(out))
    run = output.start_run()
    info = run.write_part(pl.DataFrame({"id": [1, 2]}), partition="p1", index=0)
    run.flush()  # the put is done: the part is on disk
    (out / info.path).unlink()
    with pytest.raises(OutputError, match=r"part runs/.*/part-p1-00000.parquet is missing before its manifest"):
        run.commit(model_name="loans", model_version=1, input_uri="x", rows_in=2, rows_scored=2, rows_quarantined=0)
    assert read_predictions(str(out))["id"].to_list() == [0, 1, 2, 3]
    with pytest.raises(OutputError, match="partition key 'a/b' cannot name a file"):
        part_name("a/b", 0)


def test_a_directory_that_is_not_a_driftloop_output_is_refused_untouched(tmp_path: Path) -> None:
    users = tmp_path / "data"
    users.mkdir()
    (users / "notes.csv").write_text("mine")
    with pytest.raises(OutputError, match=rf"refusing to write the scoring output into {users}.*notes.csv"):
        ScoringOutput(str(users)).claim()
    assert [p.name for p in users.iterdir()] == ["notes.csv"]
    assert ScoringOutput(str(users)).collect_garbage(now=datetime.now(UTC) + timedelta(days=9)) == []
    spark = tmp_path / "spark"  # _SUCCESS and part files, but not driftloop's
    spark.mkdir()
    for name in ("_SUCCESS", "._SUCCESS.crc", "part-00000-1b2c.snappy.parquet"):
        (spark / name).write_bytes(b"theirs")
    with pytest.raises(OutputError, match="refusing to write"):
        ScoringOutput(str(spark)).claim()
    assert sorted(p.name for p in spark.iterdir()) == ["._SUCCESS.crc", "_SUCCESS", "part-00000-1b2c.snappy.parquet"]
    ScoringOutput(str(tmp_path / "empty")).claim()  # new or empty: fine
    assert json.loads((tmp_path / "empty" / MARKER).read_text())["kind"] == "driftloop-scoring-output"


def test_an_output_from_before_manifests_is_read_then_replaced(tmp_path: Path) -> None:
    out = tmp_path / "old"
    (out / "quarantine").mkdir(parents=True)
    pl.DataFrame({"id": [1, 2]}).write_parquet(out / "part-00000.parquet")
    pl.DataFrame({"id": [3]}).write_parquet(out / "part-00001.parquet")
    pl.DataFrame({"id": [9]}).write_parquet(out / "quarantine" / "part-00000.parquet")
    (out / "_SUCCESS").touch()
    assert read_predictions(str(out))["id"].to_list() == [1, 2, 3]
    assert read_quarantine(str(out))["id"].to_list() == [9]
    _run(out, range(50, 53), commit=False)  # a first run in the new layout crashed: the old output still reads
    assert read_predictions(str(out))["id"].to_list() == [1, 2, 3]
    _run(out, range(3))
    assert read_predictions(str(out))["id"].to_list() == [0, 1, 2]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, MANIFESTS, RUNS]
    assert len(list((out / RUNS).iterdir())) == 2  # the crashed run waits for the grace period


def test_parts_are_put_on_their_own_thread_a_few_at_a_time_and_the_commit_waits_for_them(tmp_path: Path,
                                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread encodes; a put thread writes. While the disk is slow, at most
    PUTS_IN_FLIGHT parts wait in memory (the next write_part blocks), and the manifest
    lists every part, written before it."""
    import threading

    from driftloop.outputs import PUTS_IN_FLIGHT

    out = tmp_path / "predictions"
    output = ScoringOutput(str(out))
    output.claim()
    run = output.start_run()
    gate, put_threads = threading.Event(), []
    put = output.put_part

    def slow_put(info, data):
        put_threads.append(threading.current_thread().name)
        gate.wait(timeout=30)
        put(info, data)

    monkeypatch.setattr(output, "put_part", slow_put)
    written: list[int] = []

    def writer() -> None:
        for index in range(PUTS_IN_FLIGHT + 2):
            run.write_part(pl.DataFrame({"id": [index]}), partition="00000", index=index)
            written.append(index)

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(timeout=1.0)
    assert thread.is_alive() and written == list(range(PUTS_IN_FLIGHT))  # the next one waits for the disk
    gate.set()
    thread.join(timeout=30)
    manifest = run.commit(model_name="loans", model_version=1, input_uri="x", rows_in=4, rows_scored=4, rows_quarantined=0)
    assert sorted(p.path for p in manifest.parts) == [f"{RUNS}/{run.run_id}/{part_name('00000', i)}" for i in range(4)]
    assert set(put_threads) == {"driftloop-put_0"}
    assert sorted(read_predictions(str(out))["id"].to_list()) == [0, 1, 2, 3]


def test_a_failed_put_fails_the_commit_and_leaves_the_previous_run_current(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    out = tmp_path / "predictions"
    _run(out, range(4))
    output = ScoringOutput(str(out))
    run = output.start_run()

    def full_disk(info, data):
        raise OSError(errno.ENOSPC, "No space left on device", info.path)

    monkeypatch.setattr(output, "put_part", full_disk)
    run.write_part(pl.DataFrame({"id": [9]}), partition="00000", index=0)  # the put fails on its own thread
    with pytest.raises(OSError, match="No space left"):
        run.commit(model_name="loans", model_version=1, input_uri="x", rows_in=1, rows_scored=1, rows_quarantined=0)
    run.abort()
    assert read_predictions(str(out))["id"].to_list() == [0, 1, 2, 3]
    assert not (out / RUNS / run.run_id).exists()
