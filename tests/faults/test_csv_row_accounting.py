"""Malformed CSV records are recorded by pyarrow's parse callbacks on its own threads
while batches are handed out: none may be lost, whatever the thread timing. Scored many
times over, a large CSV with malformed lines spread through it always accounts for
every row: rows_in == rows_scored + rows_quarantined."""

from __future__ import annotations

from pathlib import Path

import pytest

from driftloop.onnx_model import load_model
from driftloop.spec import load_spec
from driftloop.tasks.export import build_onnx
from driftloop.tasks.fit import fit_model, prepare_training_data
from driftloop.tasks.score import score_stream
from driftloop.tasks.split import split_dataset
from tests.support.data import make_loans, write_spec

ROWS = 120_000
EVERY = 997  # a malformed record (a field too many) after every 997th line


@pytest.fixture(scope="module")
def scored_input(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("csv")
    spec = load_spec(write_spec(root))
    split = split_dataset(make_loans(3000, seed=1), spec, seed=0)
    data, encoding, _ = prepare_training_data(spec, split.train, split.valid)
    model = load_model(build_onnx(fit_model("lightgbm", {"num_leaves": 7}, data, seed=0), encoding, spec,
                                  {"spec": spec.model_dump(mode="json")}))
    lines = make_loans(ROWS, seed=3).drop("repaid").write_csv().splitlines()
    header, body = lines[0], lines[1:]
    out = [header]
    malformed = 0
    for i, line in enumerate(body, start=1):
        out.append(line)
        if i % EVERY == 0:
            out.append(line + ",surplus,fields")
            malformed += 1
    path = root / "large.csv"
    path.write_text("\n".join(out) + "\n")
    return model, path, malformed


@pytest.mark.parametrize("attempt", range(6))
def test_every_row_is_scored_or_quarantined(scored_input: tuple, tmp_path: Path, attempt: int) -> None:
    model, path, malformed = scored_input
    # Small batches: many hand-overs while the parser's threads record malformed lines.
    result = score_stream(model, str(path), str(tmp_path / "out"), model_name="loans", model_version=1,
                          batch_size=2_000 + 1_000 * attempt)
    assert result.rows_in == ROWS + malformed
    assert result.rows_quarantined == malformed
    assert result.rows_in == result.rows_scored + result.rows_quarantined


def test_a_failing_consumer_stops_the_reader_and_closes_the_input(scored_input: tuple, tmp_path: Path) -> None:
    """The reader thread must not block forever on a full queue when scoring fails, and the
    input handle must be closed."""
    import threading

    from driftloop.tasks.score import _prefetch, iter_input

    _, path, _ = scored_input
    before = {t for t in threading.enumerate() if t.name == "driftloop-reader"}
    batches, _ = iter_input(str(path), 1_000)
    consumed = _prefetch(batches)
    next(consumed)
    consumed.close()  # what a raising consumer's generator cleanup does
    alive = [t for t in threading.enumerate() if t.name == "driftloop-reader" and t not in before]
    assert not alive, "the reader thread outlived its consumer"
    assert batches.gi_frame is None  # the input generator finished: its handle was closed
