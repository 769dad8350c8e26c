"""The registry store on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from driftloop.errors import RegistryError
from driftloop.registry import ChampionChanged, DatasetRecord, IncompleteVersion, VersionDraft
from driftloop.registry.migrate import current_revision, head_revision, upgrade
from driftloop.registry.store import RegistryStore, create_registry_engine, open_registry


def record(dataset_id: str = "ds_0001", name: str = "loans") -> DatasetRecord:
    return DatasetRecord(
        id=dataset_id, name=name, content_hash="c" * 64, spec_hash="s" * 64, source="x.csv",
        labelled=True, rows_in=10, rows_valid=9, rows_quarantined=1, snapshot_uri="/a/rows.parquet",
        quarantine_uri="/a/q.parquet", column_types={"id": "Int64"}, created_at=datetime.now(UTC),
    )


def exercise_store(store: RegistryStore) -> None:
    stored, created = store.add_dataset(record())
    assert created and stored.id == "ds_0001"
    again, created = store.add_dataset(record())
    assert not created and again.created_at == stored.created_at
    store.add_dataset(record("ds_0002", name="other"))
    assert [d.id for d in store.list_datasets(name="loans")] == ["ds_0001"]
    assert {d.id for d in store.list_datasets()} == {"ds_0001", "ds_0002"}
    assert store.get_dataset("ds_0001").column_types == {"id": "Int64"}
    assert store.get_dataset("absent") is None


def test_sqlite_registry(tmp_path: Path) -> None:
    store = open_registry(f"sqlite:///{tmp_path / 'nested' / 'registry.db'}")
    assert current_revision(store.engine) == head_revision()
    exercise_store(store)



def test_timestamps_read_back_from_sqlite_are_utc_aware(tmp_path: Path) -> None:
    """SQLite keeps no zone; every timestamp column (one type, UtcDateTime) gives UTC back."""
    from datetime import timedelta, timezone

    from driftloop.registry.tables import DatasetRow, RetrainLeaseRow, UtcDateTime

    assert all(isinstance(c.type, UtcDateTime) for t in DatasetRow.metadata.sorted_tables for c in t.columns
               if isinstance(c.type, sa.DateTime | UtcDateTime))
    store = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    written = datetime(2026, 3, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))  # 12:30 UTC
    store.add_dataset(record().model_copy(update={"created_at": written}))
    read = store.get_dataset("ds_0001").created_at
    assert read.tzinfo is not None and read.utcoffset() == timedelta(0) and read == written
    assert read.hour == 12
    with store.session() as s:  # a naive value written is taken as UTC
        s.add(RetrainLeaseRow(model_name="loans", holder="me", acquired_at=datetime(2026, 3, 1, 9),
                              expires_at=written, finished_at=None, outcome=None))
    with store.session() as s:
        lease = s.get(RetrainLeaseRow, "loans")
        assert lease.acquired_at == datetime(2026, 3, 1, 9, tzinfo=UTC) and lease.expires_at == written
        assert lease.expires_at.utcoffset() == timedelta(0) and lease.finished_at is None
    with store.engine.connect() as conn:  # what SQLite holds: the UTC wall time, no zone
        raw = conn.execute(sa.text("SELECT created_at FROM datasets")).scalar_one()
    assert str(raw).startswith("2026-03-01 12:30:00")

def test_upgrade_keeps_an_earlier_release_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_registry_engine(url)
    upgrade(engine, "0001")  # the first release's schema
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO datasets VALUES ('ds_old','loans','h','s','f.csv',1,1,1,0,'u',NULL,'{}',"
                "'2026-01-01 00:00:00')"
            )
        )
    engine.dispose()
    store = open_registry(url)
    assert current_revision(store.engine) == head_revision()
    assert store.get_dataset("ds_old").rows_in == 1


def test_unreachable_registry_is_a_clear_error() -> None:
    with pytest.raises(RegistryError, match=r"cannot open the registry database postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/x"):
        open_registry("postgresql+psycopg://u:secret@127.0.0.1:1/x")


_CONCURRENT_OPEN = """
import sys
from driftloop.registry.store import open_registry
from tests.unit.test_registry import record
store = open_registry(sys.argv[1])
store.add_dataset(record("ds_" + sys.argv[2]))
store.add_dataset(record("ds_shared"))
"""


def open_concurrently(url: str, n: int = 4) -> None:
    """Several fresh processes upgrade and write the same database at once."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT_OPEN, url, str(i)], stderr=subprocess.PIPE)
        for i in range(n)
    ]
    errors = [p.communicate()[1].decode() for p in procs if p.wait() != 0]
    assert not errors, errors[0]


def test_sqlite_concurrent_first_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    open_concurrently(url)
    assert len(open_registry(url).list_datasets()) == 5


@pytest.mark.postgres
def test_postgres_registry(postgres) -> None:
    store = open_registry(postgres.create_database("registry_basic"))
    assert current_revision(store.engine) == head_revision()
    exercise_store(store)


@pytest.mark.postgres
def test_postgres_concurrent_first_open(postgres) -> None:
    url = postgres.create_database("registry_race")
    open_concurrently(url)
    assert len(open_registry(url).list_datasets()) == 5


def version_draft(name: str = "loans", **overrides) -> VersionDraft:
    draft = {
        "model_name": name, "algorithm": "xgboost", "task": "binary_classification", "params": {"max_depth": 3},
        "metrics": {"roc_auc": 0.8}, "segment_metrics": {}, "seed": 0, "dataset_id": "ds_1", "dataset_hash": "h" * 64,
        "spec_hash": "s" * 64, "split": {"method": "time"}, "library_versions": {}, "onnx_uri": "/m.onnx",
        "onnx_sha256": "0" * 64, "gate": {"passed": True, "reasons": []}, "parity": {"passed": True},
    }
    return VersionDraft(**{**draft, **overrides})


def complete(store: RegistryStore, version: int, name: str = "loans") -> int:
    """What training writes after registering: the reference and the card."""
    store.set_reference(name, version, f"/models/{name}/v{version}/reference.parquet", "r" * 64)
    store.set_card_uri(name, version, f"/models/{name}/v{version}/model_card.md")
    return version


def test_versions_aliases_promote_and_rollback(tmp_path: Path) -> None:
    store = open_registry(f"sqlite:///{tmp_path / 'models.db'}")
    v1 = store.register_version(version_draft())
    v2 = store.register_version(version_draft())
    assert (v1.version, v2.version) == (1, 2)
    assert store.aliases("loans") == {}  # no alias until reference and card exist
    for version in (1, 2):
        complete(store, version)
        store.set_alias("loans", "challenger", version, actor="driftloop", reason="registered")
    assert store.aliases("loans") == {"challenger": 2}
    store.promote("loans", 1, actor="alice", reason="first")
    store.promote("loans", 2, actor="bob", reason="better auc")
    assert store.aliases("loans") == {"champion": 2}  # challenger was promoted, so it is gone
    assert store.resolve("loans").version == 2 and store.resolve("loans@champion").version == 2
    assert store.resolve("loans:1").version == 1
    assert store.rollback("loans", actor="carol", reason="v2 misbehaves") == 1
    assert store.resolve("loans@champion").version == 1
    history = [(e.alias, e.from_version, e.to_version, e.actor) for e in store.alias_history("loans")]
    assert history == [
        ("challenger", None, 1, "driftloop"), ("challenger", 1, 2, "driftloop"),
        ("champion", None, 1, "alice"), ("champion", 1, 2, "bob"), ("challenger", 2, None, "bob"),
        ("champion", 2, 1, "carol"),
    ]
    assert store.alias_history("loans")[-1].reason == "rollback: v2 misbehaves"
    with pytest.raises(Exception, match="was the first champion"):
        store.rollback("loans", actor="carol", reason="again")
    with pytest.raises(Exception, match="has no version 9"):
        store.promote("loans", 9, actor="x", reason="y")
    with pytest.raises(Exception, match="has no 'champion' alias"):
        store.resolve("other@champion")


_CONCURRENT_REGISTER = """
import sys
from driftloop.registry.store import open_registry
from tests.unit.test_registry import version_draft
store = open_registry(sys.argv[1])
print(",".join(str(store.register_version(version_draft()).version) for _ in range(int(sys.argv[2]))))
"""


def register_concurrently(url: str, processes: int = 4, each: int = 5) -> None:
    open_registry(url)  # schema first: this test is about version allocation
    procs = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT_REGISTER, url, str(each)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    got = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        got += [int(v) for v in out.strip().split(",")]
    assert sorted(got) == list(range(1, processes * each + 1))
    versions = [v.version for v in open_registry(url).list_versions("loans")]
    assert sorted(versions) == list(range(1, processes * each + 1))


def test_concurrent_registration_sqlite(tmp_path: Path) -> None:
    register_concurrently(f"sqlite:///{tmp_path / 'concurrent.db'}")


@pytest.mark.postgres
def test_concurrent_registration_postgres(postgres) -> None:
    register_concurrently(postgres.create_database("registry_versions"))


def test_promotion_is_a_compare_and_swap(tmp_path: Path) -> None:
    store = open_registry(f"sqlite:///{tmp_path / 'cas.db'}")
    for _ in range(3):
        complete(store, store.register_version(version_draft()).version)
    store.promote("loans", 1, actor="a", reason="first", expected_champion=None)
    store.promote("loans", 2, actor="b", reason="judged against v1", expected_champion=1)
    # v3 was judged against v1 too, but v2 became champion meanwhile: nothing moves.
    with pytest.raises(ChampionChanged, match="the champion is v2 now, not v1"):
        store.promote("loans", 3, actor="c", reason="judged against v1", expected_champion=1)
    assert store.aliases("loans")["champion"] == 2


_LEASE = """
import sys, time
from pathlib import Path
from driftloop.registry.store import open_registry
url, name, flags, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
store = open_registry(url)
(flags / f"ready-{name}").touch()
while len(list(flags.glob("ready-*"))) < n:  # barrier: all ask at once
    time.sleep(0.01)
decision = store.acquire_retrain_lease("loans", name, cooldown_s=600, ttl_s=3600)
print(decision.acquired, decision.reason, flush=True)
(flags / f"decided-{name}").touch()
if decision.acquired:
    while len(list(flags.glob("decided-*"))) < n:  # hold the lease until every other one has asked
        time.sleep(0.01)
    store.release_retrain_lease("loans", name, "trained")
"""


def lease_race(url: str, flags: Path, processes: int = 4) -> None:
    store = open_registry(url)
    store.register_version(version_draft())
    flags.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _LEASE, url, f"run-{i}", str(flags), str(processes)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]
    outcomes = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outcomes.append(out.strip())
    winners = [o for o in outcomes if o.startswith("True")]
    assert len(winners) == 1, outcomes
    losers = [o for o in outcomes if o.startswith("False")]
    # Every loser asked while the winner held the lease: each was told a retrain runs
    # (not "cooldown", which is what asking after the winner finished would say).
    assert len(losers) == processes - 1 and all("another retrain of loans is running" in o for o in losers), losers
    # Finished and trained: the cooldown holds; a retrain that only waited for labels does not.
    again = store.acquire_retrain_lease("loans", "later", cooldown_s=600, ttl_s=3600)
    assert not again.acquired and again.reason.startswith("cooldown: the last retrain of loans") and "(trained)" in again.reason
    assert store.acquire_retrain_lease("loans", "later", cooldown_s=0, ttl_s=3600).acquired
    store.release_retrain_lease("loans", "later", "waiting")
    assert store.acquire_retrain_lease("loans", "next", cooldown_s=600, ttl_s=3600).acquired
    # A lease whose holder died expires; until then it blocks.
    assert not store.acquire_retrain_lease("loans", "other", cooldown_s=0, ttl_s=3600).acquired


def test_retrain_lease_sqlite(tmp_path: Path) -> None:
    lease_race(f"sqlite:///{tmp_path / 'lease.db'}", tmp_path / "flags")


@pytest.mark.postgres
def test_retrain_lease_postgres(postgres, tmp_path: Path) -> None:
    lease_race(postgres.create_database("registry_lease"), tmp_path / "flags")


def _lease_expiry(store: RegistryStore) -> datetime:
    from driftloop.registry.tables import RetrainLeaseRow

    with store.session() as s:
        expires = s.get(RetrainLeaseRow, "loans").expires_at
    return expires.replace(tzinfo=UTC) if expires.tzinfo is None else expires


def _wait_until_past(moment: datetime) -> None:
    while datetime.now(UTC) <= moment:
        time.sleep(0.05)


def test_a_renewed_lease_outlives_its_ttl_and_an_unrenewed_one_is_taken_over(tmp_path: Path) -> None:
    """A retrain longer than the lease's TTL keeps its lease while its heartbeat renews it;
    once renewals stop (the retrain died), the lease expires and the next retrain takes it."""
    from datetime import timedelta

    from driftloop.tasks.retrain import LeaseHeartbeat

    store = open_registry(f"sqlite:///{tmp_path / 'heartbeat.db'}")
    store.register_version(version_draft())
    ttl = 2.0
    assert store.acquire_retrain_lease("loans", "long-retrain", cooldown_s=0, ttl_s=ttl).acquired
    first_expiry = _lease_expiry(store)
    with LeaseHeartbeat(store, "loans", "long-retrain", ttl_s=ttl, interval_s=0.2) as beat:
        _wait_until_past(first_expiry + timedelta(seconds=0.5))  # past the TTL it was taken with
        decision = store.acquire_retrain_lease("loans", "second", cooldown_s=0, ttl_s=ttl)
        assert not decision.acquired and "another retrain of loans is running" in decision.reason, decision
        assert beat.renewals > 0 and not beat.lost
    # The heartbeat stopped without a release, as when the process dies: the lease expires.
    _wait_until_past(_lease_expiry(store))
    taken = store.acquire_retrain_lease("loans", "second", cooldown_s=0, ttl_s=ttl)
    assert taken.acquired, taken
    assert not store.renew_retrain_lease("loans", "long-retrain", ttl_s=ttl)  # the old holder learns it lost it


def test_retrain_lease_needs_a_registered_model(tmp_path: Path) -> None:
    store = open_registry(f"sqlite:///{tmp_path / 'nolease.db'}")
    with pytest.raises(Exception, match="model 'ghost' is not registered"):
        store.acquire_retrain_lease("ghost", "x", cooldown_s=0, ttl_s=60)


@pytest.mark.postgres
def test_the_longest_model_name_fits_its_labels_and_window_datasets(postgres) -> None:
    store = open_registry(postgres.create_database("registry_names"))
    longest = "m" * 64  # what the spec's name pattern allows
    for suffix in (".labels", ".window"):
        stored, created = store.add_dataset(record(f"ds_{suffix[1:]}", name=longest + suffix))
        assert created and stored.name == longest + suffix
    assert [d.name for d in store.list_datasets(name=longest + ".labels")] == [longest + ".labels"]


def test_a_version_registered_without_an_alias_until_it_is_settled(tmp_path: Path) -> None:
    """A crash between registration and the alias move leaves an unaliased version, never
    a champion or challenger without its reference and card."""
    from driftloop.tasks.register import register_unaliased, settle_aliases

    store = open_registry(f"sqlite:///{tmp_path / 'settle.db'}")
    first = register_unaliased(store, version_draft())
    assert store.aliases("loans") == {}  # what a crash here leaves behind
    complete(store, first.version)
    assert settle_aliases(store, first, promote=True, judged_against=None, actor="t") == (True, None)
    second = register_unaliased(store, version_draft(gate={"passed": False, "reasons": ["roc_auc < min"]}))
    complete(store, second.version)
    assert settle_aliases(store, second, promote=True, judged_against=1, actor="t") == (False, None)
    assert store.aliases("loans") == {"champion": 1, "challenger": 2}
    third = register_unaliased(store, version_draft())
    complete(store, third.version)
    promoted, refused = settle_aliases(store, third, promote=True, judged_against=None, actor="t")  # stale judgement
    assert not promoted and "the champion is v1 now" in refused
    assert store.aliases("loans") == {"champion": 1, "challenger": 3}


def test_cli_promote_refuses_a_half_written_version_and_a_moved_champion(home: Path, capsys) -> None:
    """``models promote`` goes through the retrain's checks: an alias only once the
    version's reference and card exist, and only if the champion is still what was seen."""
    from driftloop.cli import main
    from driftloop.settings import get_settings

    store = open_registry(get_settings().registry_database_url())
    v1 = complete(store, store.register_version(version_draft()).version)
    store.promote("loans", v1, actor="t", reason="first", expected_champion=None)
    v2 = store.register_version(version_draft()).version  # training died here: no reference, no card
    assert main(["models", "promote", "loans", str(v2), "--reason", "looks fine"]) == 1
    assert "v2 has no monitoring reference and no model card" in capsys.readouterr().err
    store.set_reference("loans", v2, "/ref.parquet", "r" * 64)  # ... or died after the reference
    assert main(["models", "promote", "loans", str(v2), "--reason", "looks fine"]) == 1
    assert "v2 has no model card" in capsys.readouterr().err
    assert store.aliases("loans") == {"champion": 1}
    assert main(["models", "rollback", "loans", "--reason", "x"]) == 1  # v1 was the first champion
    capsys.readouterr()

    complete(store, v2)
    v3 = complete(store, store.register_version(version_draft()).version)
    # Reviewed while v1 was champion; v3 became champion meanwhile: nothing moves.
    store.promote("loans", v3, actor="other", reason="meanwhile")
    assert main(["models", "promote", "loans", str(v2), "--reason", "reviewed", "--expect-champion", "1"]) == 1
    assert "the champion is v3 now, not v1" in capsys.readouterr().err
    assert main(["models", "rollback", "loans", "--reason", "v2 misbehaves", "--expect-champion", "2"]) == 1
    assert "the champion is v3 now, not v2" in capsys.readouterr().err
    assert store.aliases("loans") == {"champion": 3}
    assert main(["models", "rollback", "loans", "--reason", "v3 misbehaves", "--expect-champion", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["champion"] == 1
    with pytest.raises(IncompleteVersion):
        store.set_alias("loans", "challenger", store.register_version(version_draft()).version, actor="t", reason="x")


@pytest.mark.postgres
def test_rollback_waits_for_a_concurrent_promotion_and_walks_back_from_it(postgres) -> None:
    """A promotion in flight (its transaction holds the model's row lock and has moved the
    champion, not yet committed) when a rollback starts: the rollback must wait and roll
    back the promoted version, not the one it saw before (which sent the champion two
    versions back, to v1)."""
    url = postgres.create_database("registry_rollback_race")
    store = open_registry(url)
    for _ in range(3):
        complete(store, store.register_version(version_draft()).version)
    store.promote("loans", 1, actor="a", reason="first")
    store.promote("loans", 2, actor="a", reason="second")

    promoting = store._sessions()
    promoting.begin()
    store._locked_model(promoting, "loans")
    store._move_alias(promoting, "loans", "champion", 3, "b", "third")  # not committed yet
    outcome: dict[str, object] = {}

    def roll_back() -> None:
        try:
            outcome["version"] = open_registry(url).rollback("loans", actor="c", reason="the newest misbehaves")
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=roll_back)
    thread.start()
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    with store.engine.connect() as conn:
        while not conn.execute(sa.text(waiting)).scalar() and thread.is_alive():
            conn.rollback()  # pg_stat_activity is a snapshot per transaction
            time.sleep(0.05)  # until the rollback waits on a lock (no timing is asserted)
    promoting.commit()
    thread.join(timeout=120)
    assert outcome == {"version": 2}, outcome
    assert store.aliases("loans") == {"champion": 2}
    assert [(e.from_version, e.to_version) for e in store.alias_history("loans") if e.alias == "champion"][-2:] == [(2, 3), (3, 2)]


def _no_nan(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


@pytest.mark.postgres
def test_undefined_metrics_are_stored_and_printed_as_null_with_the_reason(postgres, monkeypatch, capsys) -> None:
    """A holdout (or a segment) holding one class has no ROC AUC: NaN. PostgreSQL's json
    rejected it, failing the registration after all the training work, and ``--json``
    printed a bare NaN."""
    import math

    import numpy as np

    from driftloop.cli import main
    from driftloop.cli.common import emit
    from driftloop.tasks.evaluate import compute_metrics
    from driftloop.tasks.register import render_model_card

    one_class = compute_metrics("binary_classification", np.zeros(40, dtype=int), np.linspace(0.1, 0.4, 40))
    both = compute_metrics("binary_classification", np.arange(40) % 2, np.linspace(0.1, 0.9, 40))
    assert math.isnan(one_class["roc_auc"]) and math.isnan(one_class["pr_auc"]) and not math.isnan(both["roc_auc"])
    url = postgres.create_database("registry_undefined_metrics")
    monkeypatch.setenv("DRIFTLOOP_REGISTRY_URL", url)
    store = open_registry(url)
    record = store.register_version(version_draft(
        metrics=one_class, segment_metrics={"north": {"rows": 40, **one_class}, "south": {"rows": 40, **both}},
        gate={"passed": False, "metric": "roc_auc", "reasons": ["roc_auc undefined"], "challenger_metrics": one_class},
        split={"method": "random"}, parity={"passed": True, "max_abs_diff": 0.0, "tolerance": 1e-5, "label_flips": 0, "rows": 100_000},
    ))
    stored = store.get_version("loans", record.version)
    assert stored.metrics["roc_auc"] is None and stored.metrics["accuracy"] == one_class["accuracy"]
    assert stored.segment_metrics["north"]["roc_auc"] is None and stored.segment_metrics["south"]["roc_auc"] == both["roc_auc"]
    card = render_model_card(stored, promoted=False)
    assert "| roc_auc | n/a (undefined: the rows hold one class only" in card and "| north | 40 | n/a (undefined" in card

    assert main(["models", "show", "loans:1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out, parse_constant=_no_nan)
    assert shown["metrics"]["roc_auc"] is None and "one class" in shown["undefined_metrics"]["roc_auc"]
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out, parse_constant=_no_nan)
    assert "one class" in listed["models"][0]["versions"][0]["undefined_metrics"]["pr_auc"]
    assert main(["models", "show", "loans:1"]) == 0
    assert "roc_auc n/a (undefined: the rows hold one class only" in capsys.readouterr().out
    # What `driftloop train --json` prints for a result holding NaN (in memory) is JSON too.
    emit({"metrics": one_class, "gate": {"champion_metrics": {"roc_auc": float("nan")}}}, True, str)
    printed = json.loads(capsys.readouterr().out, parse_constant=_no_nan)
    assert printed["metrics"]["roc_auc"] is None and printed["gate"]["champion_metrics"]["roc_auc"] is None
