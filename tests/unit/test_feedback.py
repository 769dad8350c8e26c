"""Training-window selection over a model's labelled rows (no server, no registry)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest

from driftloop.errors import SpecError
from driftloop.feedback import (
    REGISTERED_AT,
    SOURCE,
    EmptyWindow,
    LabelledData,
    champion_data_end,
    select_window,
    training_columns,
)
from driftloop.spec import DatasetSpec, parse_spec
from tests.support.data import LOAN_SPEC

T0 = datetime(2024, 1, 1)
REG0 = datetime(2024, 2, 1)


def loan_spec(retrain: dict[str, Any] | None = None, *, timestamp: bool = True) -> DatasetSpec:
    data: dict[str, Any] = {**LOAN_SPEC}
    if not timestamp:
        data.pop("timestamp")
        data["columns"] = {k: v for k, v in LOAN_SPEC["columns"].items() if k != "ts"}
    if retrain is not None:
        data["retrain"] = retrain
    return parse_spec(data)


def rows_frame(rows: list[tuple[int, datetime, str, datetime]], *, timestamp: bool = True) -> pl.DataFrame:
    """A labelled frame: (id, ts, source, registered_at) per row; features are filler."""
    frame = pl.DataFrame(
        {
            "id": [r[0] for r in rows],
            "ts": [r[1] for r in rows],
            "amount": [float(r[0]) for r in rows],
            "ratio": [0.5] * len(rows),
            "band": [("low", "mid", "high")[r[0] % 3] for r in rows],
            "prev_ok": [r[0] % 2 == 0 for r in rows],
            "term": [12] * len(rows),
            "repaid": [r[0] % 2 for r in rows],
            SOURCE: [r[2] for r in rows],
            REGISTERED_AT: [r[3] for r in rows],
        },
        schema_overrides={
            "id": pl.Int64,
            "ts": pl.Datetime("us"),
            "term": pl.Int64,
            "repaid": pl.Int64,
            SOURCE: pl.String,
            REGISTERED_AT: pl.Datetime("us"),
        },
    )
    return frame if timestamp else frame.drop("ts")


def daily_data(*, timestamp: bool = True) -> LabelledData:
    """20 rows, one a day from 2024-01-01: ids 1-10 from dataset ds1 (registered
    2024-02-01), ids 11-20 from scoring run run1 (registered 2024-03-01)."""
    rows = [(i, T0 + timedelta(days=i - 1), "ds1", REG0) for i in range(1, 11)]
    rows += [(i, T0 + timedelta(days=i - 1), "run1", datetime(2024, 3, 1)) for i in range(11, 21)]
    return LabelledData(
        frame=rows_frame(rows, timestamp=timestamp),
        datasets=["ds0", "ds1"],
        scoring_runs=["run0", "run1"],
        labels=12,
        labels_unscored=2,
    )


def crossed_data(*, timestamp: bool = True) -> LabelledData:
    """40 rows whose time order is the reverse of their registration order: id 1 is the
    newest by ts (2024-02-09) and the earliest registered; id 40 the oldest by ts
    (2024-01-01) and the latest registered. Ids 1-20 come from ds1, 21-40 from run1.
    The frame is in a scrambled order."""
    rows = [
        (i, T0 + timedelta(days=40 - i), "ds1" if i <= 20 else "run1", REG0 + timedelta(hours=i))
        for i in range(1, 41)
    ]
    order = [(7 * k) % 40 for k in range(40)]  # a permutation of 0..39
    return LabelledData(
        frame=rows_frame([rows[k] for k in order], timestamp=timestamp),
        datasets=["ds1"],
        scoring_runs=["run1"],
    )


def ids(frame: pl.DataFrame) -> list[int]:
    return sorted(frame["id"].to_list())


# --- by time ---------------------------------------------------------------------------


def test_last_window_keeps_rows_in_the_half_open_span() -> None:
    spec = loan_spec({"window": {"last": "10d"}})
    window = select_window(daily_data(), spec, spec.retrain)

    # end is the newest ts (2024-01-20); (2024-01-10, 2024-01-20] holds ids 11..20
    assert ids(window.frame) == list(range(11, 21))
    record = window.record
    assert record.policy == "last 10d"
    assert record.start == "2024-01-11 00:00:00"
    assert record.end == "2024-01-20 00:00:00"
    assert record.rows == 10
    assert record.skipped_recent == 0
    assert record.labels_unscored == 2
    # ds1's rows (up to 2024-01-10, the excluded boundary) are all outside the window
    assert record.dataset_ids == []
    assert record.scoring_runs == ["run1"]


def test_frame_has_exactly_the_training_columns() -> None:
    spec = loan_spec({"window": {"last": "10d"}})
    window = select_window(daily_data(), spec, spec.retrain)
    assert window.frame.columns == training_columns(spec)
    assert window.frame.columns == ["id", "ts", "amount", "ratio", "band", "prev_ok", "term", "repaid"]
    assert SOURCE not in window.frame.columns and REGISTERED_AT not in window.frame.columns

    bare = loan_spec({"window": {"rows": 30}}, timestamp=False)
    window = select_window(crossed_data(timestamp=False), bare, bare.retrain)
    assert window.frame.columns == training_columns(bare)
    assert window.frame.columns == ["id", "amount", "ratio", "band", "prev_ok", "term", "repaid"]


def test_skip_recent_moves_the_end_back_and_counts_what_it_leaves_out() -> None:
    spec = loan_spec({"window": {"all": True}, "skip_recent": "3d"})
    window = select_window(daily_data(), spec, spec.retrain)

    # newest ts 2024-01-20 minus 3 days: rows of 01-18, 01-19 and 01-20 are too recent
    assert ids(window.frame) == list(range(1, 18))
    assert window.record.end == "2024-01-17 00:00:00"
    assert window.record.start == "2024-01-01 00:00:00"
    assert window.record.rows == 17
    assert window.record.skipped_recent == 3
    assert window.record.dataset_ids == ["ds1"]
    assert window.record.scoring_runs == ["run1"]


def test_skip_recent_with_last_reaches_back_from_the_moved_end() -> None:
    spec = loan_spec({"window": {"last": "10d"}, "skip_recent": "3d"})
    window = select_window(daily_data(), spec, spec.retrain)

    # end 2024-01-17; (2024-01-07, 2024-01-17] holds ids 8..17
    assert ids(window.frame) == list(range(8, 18))
    assert not {18, 19, 20} & set(window.frame["id"].to_list())
    record = window.record
    assert (record.start, record.end) == ("2024-01-08 00:00:00", "2024-01-17 00:00:00")
    assert record.rows == 10
    assert record.skipped_recent == 3
    assert record.dataset_ids == ["ds1"]
    assert record.scoring_runs == ["run1"]


def test_skip_recent_in_hours_keeps_sub_day_precision() -> None:
    spec = loan_spec({"window": {"all": True}, "skip_recent": "36h"})
    window = select_window(daily_data(), spec, spec.retrain)
    # 2024-01-20 00:00 - 36h = 2024-01-18 12:00: the 01-19 and 01-20 rows are left out
    assert window.record.end == "2024-01-18 12:00:00"
    assert window.record.skipped_recent == 2
    assert ids(window.frame) == list(range(1, 19))


# --- by rows ---------------------------------------------------------------------------


def test_rows_window_with_timestamp_takes_the_newest_by_time() -> None:
    spec = loan_spec({"window": {"rows": 30}})
    window = select_window(crossed_data(), spec, spec.retrain)

    # newest by ts are ids 1..30 (not the 30 most recently registered, ids 11..40)
    assert ids(window.frame) == list(range(1, 31))
    assert window.frame["ts"].is_sorted()
    record = window.record
    assert record.policy == "newest 30 rows"
    assert record.rows == 30
    assert record.start == "2024-01-11 00:00:00"  # id 30
    assert record.end == "2024-02-09 00:00:00"  # id 1
    assert record.dataset_ids == ["ds1"]
    assert record.scoring_runs == ["run1"]


def test_rows_window_with_timestamp_counts_after_skip_recent() -> None:
    spec = loan_spec({"window": {"rows": 30}, "skip_recent": "5d"})
    window = select_window(crossed_data(), spec, spec.retrain)
    # ids 1..5 (02-05 .. 02-09) are too recent; the next 30 by time are ids 6..35
    assert window.record.skipped_recent == 5
    assert ids(window.frame) == list(range(6, 36))
    assert window.record.end == "2024-02-04 00:00:00"


def test_rows_window_without_timestamp_takes_the_latest_registered() -> None:
    spec = loan_spec({"window": {"rows": 30}}, timestamp=False)
    window = select_window(crossed_data(timestamp=False), spec, spec.retrain)

    assert ids(window.frame) == list(range(11, 41))
    record = window.record
    assert record.rows == 30
    assert record.start is None and record.end is None
    assert record.skipped_recent == 0
    assert record.dataset_ids == ["ds1"]
    assert record.scoring_runs == ["run1"]


def test_rows_window_without_timestamp_lists_only_sources_it_took() -> None:
    spec = loan_spec({"window": {"rows": 30}}, timestamp=False)
    data = crossed_data(timestamp=False)
    # move ids 1..10 (the earliest registered) into a dataset of their own
    data.frame = data.frame.with_columns(
        pl.when(pl.col("id") <= 10).then(pl.lit("ds_old")).otherwise(pl.col(SOURCE)).alias(SOURCE)
    )
    data.datasets = ["ds_old", "ds1"]
    window = select_window(data, spec, spec.retrain)
    assert window.record.dataset_ids == ["ds1"]


def test_rows_window_larger_than_the_data_takes_everything() -> None:
    spec = loan_spec({"window": {"rows": 500}})
    window = select_window(crossed_data(), spec, spec.retrain)
    assert window.record.rows == 40
    assert ids(window.frame) == list(range(1, 41))


# --- all -------------------------------------------------------------------------------


def test_all_window_takes_every_row_up_to_the_end() -> None:
    spec = loan_spec({"window": {"all": True}})
    window = select_window(crossed_data(), spec, spec.retrain)
    assert ids(window.frame) == list(range(1, 41))
    record = window.record
    assert record.policy == "all labelled rows"
    assert record.rows == 40
    assert (record.start, record.end) == ("2024-01-01 00:00:00", "2024-02-09 00:00:00")
    assert record.skipped_recent == 0


def test_default_policy_is_all_rows() -> None:
    spec = loan_spec()
    assert spec.retrain.window.all is True
    window = select_window(daily_data(), spec, spec.retrain)
    assert window.record.rows == 20
    assert window.record.dataset_ids == ["ds1"]
    assert window.record.scoring_runs == ["run1"]

    bare = loan_spec(timestamp=False)
    window = select_window(daily_data(timestamp=False), bare, bare.retrain)
    assert window.record.rows == 20
    assert window.record.start is None and window.record.end is None


# --- new labels ------------------------------------------------------------------------


def test_new_labels_by_time_counts_matured_rows_after_the_champion() -> None:
    spec = loan_spec({"window": {"last": "5d"}, "skip_recent": "3d"})
    data = daily_data()
    # matured: 01-01 .. 01-17; newer than 01-15: 01-16 and 01-17 (the boundary is not new)
    window = select_window(data, spec, spec.retrain, champion_end=datetime(2024, 1, 15))
    assert window.record.new_labels == 2
    # the count is over matured rows, not only the window's (5 rows here)
    window = select_window(data, spec, spec.retrain, champion_end=datetime(2024, 1, 5))
    assert window.record.rows == 5
    assert window.record.new_labels == 12
    # no champion: every matured row is new
    assert select_window(data, spec, spec.retrain).record.new_labels == 17
    # a champion trained on everything: nothing new
    window = select_window(data, spec, spec.retrain, champion_end=datetime(2024, 1, 20))
    assert window.record.new_labels == 0


def test_new_labels_by_time_ignores_champion_sources() -> None:
    spec = loan_spec()
    window = select_window(
        daily_data(), spec, spec.retrain, champion_end=datetime(2024, 1, 18), champion_sources={"ds1", "run1"}
    )
    assert window.record.new_labels == 2


def test_new_labels_without_timestamp_counts_rows_of_unknown_sources() -> None:
    spec = loan_spec(timestamp=False)
    data = daily_data(timestamp=False)
    assert select_window(data, spec, spec.retrain, champion_sources={"ds1"}).record.new_labels == 10
    assert select_window(data, spec, spec.retrain, champion_sources={"run1"}).record.new_labels == 10
    assert select_window(data, spec, spec.retrain, champion_sources={"ds1", "run1"}).record.new_labels == 0
    assert select_window(data, spec, spec.retrain, champion_sources={"other"}).record.new_labels == 20
    assert select_window(data, spec, spec.retrain).record.new_labels == 20


def test_window_end_round_trips_as_the_next_champion_end() -> None:
    spec = loan_spec({"window": {"last": "10d"}, "skip_recent": "3d"})
    data = daily_data()
    first = select_window(data, spec, spec.retrain)
    champion_end = champion_data_end({}, first.record.model_dump())
    assert champion_end == datetime(2024, 1, 17)
    again = select_window(data, spec, spec.retrain, champion_end=champion_end)
    assert again.record.new_labels == 0


# --- empty windows ---------------------------------------------------------------------


def test_no_labelled_rows_raises_empty_window_naming_the_model_and_the_fix() -> None:
    spec = loan_spec()
    with pytest.raises(EmptyWindow) as err:
        select_window(LabelledData(frame=pl.DataFrame()), spec, spec.retrain)
    assert "'loans'" in str(err.value)
    assert "driftloop labels" in str(err.value)

    typed_empty = rows_frame([]).clear()
    with pytest.raises(EmptyWindow, match="driftloop labels"):
        select_window(LabelledData(frame=typed_empty), spec, spec.retrain)


def test_skip_recent_beyond_the_data_raises_empty_window_naming_the_window() -> None:
    spec = loan_spec({"window": {"last": "10d"}, "skip_recent": "30d"})
    with pytest.raises(EmptyWindow) as err:
        select_window(daily_data(), spec, spec.retrain)
    message = str(err.value)
    assert "'loans'" in message
    assert "last 10d" in message
    assert "skip_recent 30d" in message
    assert "of 20" in message
    assert "widen" in message


def test_skip_recent_equal_to_the_span_keeps_only_the_oldest_row() -> None:
    # 2024-01-20 - 19d = 2024-01-01: the end is inclusive, so the first row survives
    spec = loan_spec({"window": {"all": True}, "skip_recent": "19d"})
    window = select_window(daily_data(), spec, spec.retrain)
    assert ids(window.frame) == [1]
    assert window.record.skipped_recent == 19
    # one day more and nothing is left
    spec = loan_spec({"window": {"all": True}, "skip_recent": "20d"})
    with pytest.raises(EmptyWindow, match="widen"):
        select_window(daily_data(), spec, spec.retrain)


# --- spec validation -------------------------------------------------------------------


def test_last_window_needs_a_timestamp() -> None:
    with pytest.raises(SpecError, match="needs a timestamp"):
        loan_spec({"window": {"last": "30d"}}, timestamp=False)


def test_skip_recent_needs_a_timestamp() -> None:
    with pytest.raises(SpecError, match="skip_recent needs a timestamp"):
        loan_spec({"window": {"rows": 30}, "skip_recent": "2d"}, timestamp=False)
    # 0d is the default and means "skip nothing": fine without a timestamp
    assert loan_spec({"skip_recent": "0d"}, timestamp=False).retrain.skip_recent_span == timedelta(0)


def test_unknown_retrain_key_is_named() -> None:
    with pytest.raises(SpecError, match=r"retrain\.windw.*unknown key"):
        loan_spec({"windw": {"last": "30d"}})
    with pytest.raises(SpecError, match=r"retrain\.window\.lsat.*unknown key"):
        loan_spec({"window": {"lsat": "30d"}})


@pytest.mark.parametrize(
    ("window", "fragment"),
    [
        ({}, "got none"),
        ({"rows": 10, "all": True}, "greater than or equal to 30"),
        ({"rows": 30, "all": True}, "got rows, all"),
        ({"last": "30d", "rows": 100}, "got last, rows"),
        ({"rows": 10}, "greater than or equal to 30"),
        ({"all": False}, "all: false"),
        ({"last": "30 days"}, "is not a duration"),
    ],
)
def test_bad_windows_are_errors(window: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError, match="retrain.window") as err:
        loan_spec({"window": window})
    assert fragment in str(err.value)


@pytest.mark.parametrize("skip", ["2", "2m", "-1d", "1.5d", ""])
def test_bad_skip_recent_is_an_error(skip: str) -> None:
    with pytest.raises(SpecError, match="key 'retrain.skip_recent'") as err:
        loan_spec({"skip_recent": skip})
    assert f"{skip!r} is not a duration" in str(err.value)


def test_valid_retrain_sections_parse() -> None:
    spec = loan_spec({"window": {"last": "12w"}, "skip_recent": "36h", "min_new_labels": 0})
    assert spec.retrain.window.span == timedelta(weeks=12)
    assert spec.retrain.skip_recent_span == timedelta(hours=36)
    assert loan_spec({"window": {"rows": 30}}).retrain.window.span is None


def test_fingerprint_ignores_the_retrain_section() -> None:
    base = loan_spec()
    changed = loan_spec({"window": {"last": "30d"}, "skip_recent": "7d", "min_new_labels": 5})
    assert changed.retrain != base.retrain
    assert changed.fingerprint() == base.fingerprint()
    # ... but not the data part
    other = parse_spec({**LOAN_SPEC, "max_reject_fraction": 0.1})
    assert other.fingerprint() != base.fingerprint()


# --- champion_data_end -----------------------------------------------------------------


def test_champion_data_end_prefers_the_window_end() -> None:
    split = {"holdout": ["2024-01-01 00:00:00", "2024-02-01 00:00:00"]}
    assert champion_data_end(split, {"end": "2024-03-01 12:30:00"}) == datetime(2024, 3, 1, 12, 30)


def test_champion_data_end_falls_back_to_the_holdout_end() -> None:
    split = {"holdout": ["2024-01-01 00:00:00", "2024-02-01 00:00:00"]}
    assert champion_data_end(split, None) == datetime(2024, 2, 1)
    assert champion_data_end(split, {}) == datetime(2024, 2, 1)
    assert champion_data_end(split, {"end": None, "rows": 5}) == datetime(2024, 2, 1)


def test_champion_data_end_is_none_without_either() -> None:
    assert champion_data_end({}, None) is None
    assert champion_data_end({"holdout": None}, {"end": None}) is None
    assert champion_data_end({"holdout": [None, None]}, None) is None


def test_a_nullable_timestamp_is_refused() -> None:
    columns = {**LOAN_SPEC["columns"], "ts": {"dtype": "datetime", "nullable": True}}
    with pytest.raises(SpecError, match="the timestamp column 'ts' cannot be nullable"):
        parse_spec({**LOAN_SPEC, "columns": columns})
