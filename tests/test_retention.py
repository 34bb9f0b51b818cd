"""Retention like restic's forget: the pure policy on fabricated times, then in a directory.

The policy (:func:`snaptree.retention.decide`) is a function of commit
times only, so most of it is tested on made-up times, against a brute-force
reading of restic's rules (hypothesis). The directory tests fabricate dumps
whose manifests carry chosen commit times, as weeks of scheduled exports
would leave them.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import snaptree
from _cli import error_line, files_under
from _cli import snaptree as run_snaptree
from _dumps import fabricate
from snaptree import retention
from snaptree.dump_directory import latest_link, lock_directory, point_latest
from snaptree.export_run import export_into
from snaptree.manifest import manifest_path
from snaptree.retention import Dated, Retention, decide

UTC = datetime.UTC
T0 = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=UTC)  # a Monday


def hours(n: float) -> datetime.timedelta:
    return datetime.timedelta(hours=n)


def kept(policy: Retention, times: list[datetime.datetime]) -> set[datetime.datetime]:
    return {d.committed_at for d in decide([Dated(t, t) for t in times], policy) if d.keep}


# -- the policy, on made-up times --------------------------------------------------------


def test_keep_last_keeps_exactly_the_newest_n():
    times = [T0 - hours(i) for i in range(10)]
    assert kept(Retention(last=3), times) == set(times[:3])


def test_of_dumps_committed_in_the_same_microsecond_the_last_given_is_the_newest():
    """Tids closer than a microsecond share a commit time; name order (time, tid) decides."""
    dumps = [Dated(name, T0) for name in ("tid-1", "tid-2", "tid-3")]  # oldest first, as named
    decisions = decide(dumps, Retention(last=1))
    assert [(d.dump, d.keep) for d in decisions] == [
        ("tid-3", True),
        ("tid-2", False),
        ("tid-1", False),
    ]


def test_keep_daily_keeps_the_newest_dump_of_each_of_the_newest_days_that_have_one():
    """Days without a dump do not count: daily 3 over dumps every other day spans 5 days."""
    day = datetime.timedelta(days=1)
    times = [T0 - k * day - hours(h) for k in (0, 2, 4, 6) for h in (0, 1, 2)]
    assert kept(Retention(daily=3), times) == {T0, T0 - 2 * day, T0 - 4 * day}


def test_a_rule_with_periods_left_at_the_oldest_dump_keeps_it_too():
    """restic: 'also keep the oldest snapshot if the bucket has some counts left'."""
    times = [T0, T0 - hours(1), T0 - hours(2)]  # one day, daily 7: six days are left
    decisions = decide([Dated(t, t) for t in times], Retention(daily=7))
    assert [(d.committed_at, d.keep, d.reasons) for d in decisions] == [
        (T0, True, ("newest", "daily")),
        (T0 - hours(1), False, ("day 2026-11-30 has a newer dump kept (daily)",)),
        (T0 - hours(2), True, ("oldest daily",)),
    ]


def test_periods_are_utc_days_whatever_the_offset_a_dump_was_recorded_in():
    """23:30 at UTC-2 is 01:30 UTC the next day: a day of its own for daily."""
    minus_two = datetime.timezone(datetime.timedelta(hours=-2))
    late = datetime.datetime(2026, 11, 29, 23, 30, tzinfo=minus_two)  # 2026-11-30 01:30 UTC
    early = datetime.datetime(2026, 11, 30, 0, 30, tzinfo=UTC)
    evening = datetime.datetime(2026, 11, 29, 22, 0, tzinfo=UTC)
    assert kept(Retention(daily=1), [late, early, evening]) == {late}
    assert kept(Retention(daily=2), [late, early, evening]) == {late, evening}


def test_weeks_are_iso_weeks_across_a_year_end():
    """2026-12-31 (Thursday) and 2027-01-01 (Friday) are both in 2026-W53."""
    friday = datetime.datetime(2027, 1, 1, 9, tzinfo=UTC)
    thursday = datetime.datetime(2026, 12, 31, 9, tzinfo=UTC)
    sunday_before = datetime.datetime(2026, 12, 27, 9, tzinfo=UTC)  # 2026-W52
    times = [friday, thursday, sunday_before]
    assert kept(Retention(weekly=2), times) == {friday, sunday_before}
    assert kept(Retention(yearly=2), times) == {friday, thursday}


def test_keep_within_counts_back_from_the_newest_dump_not_from_now():
    times = [T0 - hours(h) for h in (0, 5, 23.9, 24, 30)]
    assert kept(Retention(within=hours(24)), times) == set(times[:3])


def test_a_dump_kept_by_one_rule_still_counts_for_the_others():
    """restic, not borg: last 1 and hourly 2 both count the newest dump."""
    times = [T0, T0 - hours(1), T0 - hours(2)]
    assert kept(Retention(last=1, hourly=2), times) == {T0, T0 - hours(1)}


def test_what_is_removed_says_why_each_rule_let_it_go():
    times = [T0 - hours(h) for h in (0, 0.5, 30, 31)]
    decisions = decide([Dated(t, t) for t in times], Retention(last=1, daily=1, within=hours(1)))
    assert decisions[2].reasons == (
        "1d6h older than the newest, not within 1h",
        "not among the 1 newest",
        "older than the 1 days kept (daily)",
    )
    assert decisions[1].reasons == ("within 1h",)


def test_policies_are_validated():
    for bad in ({}, {"last": 0}, {"daily": -1}, {"weekly": 10**6}, {"last": True}):
        with pytest.raises(snaptree.ArgumentError):
            Retention(**bad)
    with pytest.raises(snaptree.ArgumentError, match="positive"):
        Retention(within=datetime.timedelta(0))
    assert (
        Retention(last=2, daily=7, within=hours(36)).describe() == "last 2, daily 7, within 1d12h"
    )


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("15m", 900), ("36h", 129600), ("7d", 604800), ("2w", 1209600),
     ("1d12h", 129600), ("1.5h", 5400), ("600", 600)],
)  # fmt: skip
def test_durations_read_as_people_write_them(text, seconds):
    span = retention.parse_duration(text)
    assert span.total_seconds() == seconds
    assert retention.parse_duration(retention.format_duration(span)) == span


@pytest.mark.parametrize("text", ["", "3 days", "1y", "2mo", "-5m", "0s", "h", "1e-9", "1e-7"])
def test_a_duration_that_is_not_one_is_refused_with_the_forms_it_takes(text):
    with pytest.raises(snaptree.ArgumentError, match="duration"):
        retention.parse_duration(text)


@pytest.mark.parametrize("text", ["1m", "1M", "2d30m", "1.5m"])
def test_keep_within_refuses_m_which_restic_reads_as_months(text):
    """``--keep-within 1m`` kept a minute of dumps where restic and borg keep a month."""
    with pytest.raises(snaptree.ArgumentError, match="restic and borg read m as months"):
        retention.parse_retention_window(text)
    assert retention.parse_retention_window("31d") == datetime.timedelta(days=31)
    assert retention.parse_duration(text)  # elsewhere (--every, --max-age) m is a minute


# -- properties against a brute-force reading of restic's rules ---------------------------

_times = st.lists(
    st.integers(min_value=0, max_value=24 * 400).map(lambda h: T0 - hours(h)),
    min_size=1,
    max_size=40,
    unique=True,
)
_counts = st.one_of(st.none(), st.integers(min_value=1, max_value=6))


def _period_rule_by_hand(times: list[datetime.datetime], count: int, period) -> set:
    """The newest dump of each of the *count* newest periods, and the oldest if periods run out."""
    newest_first = sorted(times, reverse=True)
    periods: dict = {}
    for t in newest_first:
        periods.setdefault(period(t), t)
    chosen = set(list(periods.values())[:count])
    if len(periods) < count:
        chosen.add(newest_first[-1])
    return chosen


_PERIOD_OF = {
    "last": None,
    "hourly": lambda t: (t.date(), t.hour),
    "daily": lambda t: t.date(),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}


@given(times=_times, rule=st.sampled_from(sorted(_PERIOD_OF)), count=st.integers(1, 6))
def test_each_rule_keeps_what_restic_would(times, rule, count):
    period = _PERIOD_OF[rule] or (lambda t: t)
    assert kept(Retention(**{rule: count}), times) == _period_rule_by_hand(times, count, period)


@given(
    times=_times,
    rules=st.fixed_dictionaries({name: _counts for name in _PERIOD_OF}),
    within=st.one_of(st.none(), st.integers(1, 24 * 60).map(hours)),
)
def test_rules_keep_the_union_of_what_each_keeps_alone_and_never_the_newest_less(
    times, rules, within
):
    given_rules = {name: count for name, count in rules.items() if count is not None}
    if within is not None:
        given_rules["within"] = within
    if not given_rules:
        return
    together = kept(Retention(**given_rules), times)
    alone = set().union(*(kept(Retention(**{k: v}), times) for k, v in given_rules.items()))
    assert together == alone
    assert max(times) in together


@given(times=_times, rule=st.sampled_from(sorted(_PERIOD_OF)), count=st.integers(1, 5))
def test_a_larger_count_never_deletes_a_dump_a_smaller_one_keeps(times, rule, count):
    assert kept(Retention(**{rule: count}), times) <= kept(Retention(**{rule: count + 1}), times)


# -- in a directory of dumps ---------------------------------------------------------------


@pytest.fixture
def weeks_of_dumps(tmp_path: Path) -> list[Path]:
    """Six hourly dumps a day for three weeks, newest last; latest points at the newest."""
    dumps = [
        fabricate(tmp_path, T0 - datetime.timedelta(days=day) - hours(4 * slot))
        for day in range(21)
        for slot in range(6)
    ]
    dumps.sort(key=lambda p: p.name)
    point_latest(tmp_path, "pickle", dumps[-1])
    return dumps


def test_prune_deletes_what_no_rule_keeps_and_nothing_else(tmp_path, weeks_of_dumps):
    (tmp_path / "notes.txt").write_text("not a dump")
    stray = tmp_path / "snaptree-20200101T000000.000000Z-0000000000000001.pickle"
    stray.write_text("a dump without a manifest")
    damaged = fabricate(tmp_path, T0 - datetime.timedelta(days=60))
    manifest_path(damaged).write_text('{"snaptree_manifest": 1, "format": "pickle"}')

    [result] = snaptree.prune(tmp_path, Retention(last=3, daily=7, weekly=2))
    left = sorted(p for p in tmp_path.iterdir() if p.name.startswith("snaptree-"))
    kept_dumps = {d.dump.path for d in result.decisions if d.keep}
    # The 3 newest (all on Monday 11-30), the newest of each of the 7 newest days (Monday's
    # is the newest of all), and of the 2 newest ISO weeks: W49 (Monday's) and W48 (Sunday
    # 20:00's, already kept as that day's): 3 + 6.
    assert len(kept_dumps) == 9
    assert set(weeks_of_dumps[-3:]) <= kept_dumps
    assert {p for p in left if not p.name.endswith(".json")} == kept_dumps | {stray, damaged}
    assert result.deleted and not any(p.exists() for p in result.deleted)
    assert not any(manifest_path(p).exists() for p in result.deleted)
    assert (tmp_path / "notes.txt").exists()
    assert [p for p, _ in result.ignored] == [damaged]


@pytest.mark.parametrize(
    "damage",
    [
        {"committed_at": "0001-01-01T00:00:00+14:00"},  # no UTC equivalent
        {"committed_at": "9999-12-31T23:00:00-14:00"},
        "[" * 100_000,  # json.loads nests in C frames
    ],
    ids=["year 1 at +14:00", "year 9999 at -14:00", "nested"],
)
def test_a_manifest_retention_cannot_date_is_damaged_not_a_stop(tmp_path, damage):
    """A commit time with no UTC equivalent stopped prune and every scheduled retention
    (OverflowError), a deeply nested manifest too (RecursionError): the dump is reported
    and kept, the others are pruned."""
    dumps = [fabricate(tmp_path, T0 - hours(h)) for h in (3, 2, 1, 0)]
    odd = fabricate(tmp_path, T0 - datetime.timedelta(days=30))
    manifest = manifest_path(odd)
    if isinstance(damage, dict):
        damage = json.dumps(json.loads(manifest.read_text()) | damage)
    manifest.write_text(damage)
    [result] = snaptree.prune(tmp_path, Retention(last=1))
    assert set(result.deleted) == set(dumps[:3])
    assert [p for p, _ in result.ignored] == [odd] and odd.exists() and dumps[3].exists()


def test_dumps_of_another_store_or_subtree_are_pruned_as_their_own_history(tmp_path):
    """Two schedules that took turns in one directory: the second's ``--keep-last 1`` deleted
    the first's only dump (restic groups snapshots by host and paths likewise)."""
    ours = [fabricate(tmp_path, T0 - hours(h), source="/srv/a.fs") for h in (4, 2, 0)]
    theirs = [fabricate(tmp_path, T0 - hours(h), source="/srv/b.fs") for h in (5, 3)]
    part = fabricate(tmp_path, T0 - hours(1), source="/srv/a.fs", subtree="/users")
    [result] = snaptree.prune(tmp_path, Retention(last=1))
    assert set(result.deleted) == {*ours[:2], theirs[0]}
    assert ours[2].exists() and theirs[1].exists() and part.exists()
    times = [d.committed_at for d in result.decisions]
    assert times == sorted(times, reverse=True)  # one list, newest first
    newest = {d.dump.path: d.reasons[0] for d in result.decisions if d.keep}
    assert newest[theirs[1]] == "newest of the dumps of /srv/b.fs, subtree /"
    assert newest[part] == "newest of the dumps of /srv/a.fs, subtree /users"


def test_a_run_without_a_rule_deletes_no_manifest_and_none_leads_nowhere(store, tmp_path):
    """A run deleted the manifests whose dumps were away (a symlink into a volume not
    mounted, a dump compressed by hand), their only record, though no rule was given."""
    away = fabricate(tmp_path, T0 - datetime.timedelta(days=300))
    linked = tmp_path / "dumps" / away.name
    linked.parent.mkdir()
    linked.symlink_to(away)
    manifest_path(linked).write_bytes(manifest_path(away).read_bytes())
    away.unlink()  # the volume is gone
    gzipped = fabricate(linked.parent, T0 - datetime.timedelta(days=200))
    gzipped.rename(gzipped.with_name(gzipped.name + ".gz"))
    export_into(store, linked.parent)
    assert manifest_path(linked).exists() and manifest_path(gzipped).exists()
    export_into(store, linked.parent, keep=Retention(last=5), force=True)
    assert manifest_path(linked).exists()  # its dump is a symlink, however dangling
    assert not manifest_path(gzipped).exists()  # retention's: the dump it describes is gone


def test_prune_takes_every_format_lock_before_it_deletes_anything(tmp_path):
    """A schedule held the json lock: prune deleted the pickle dumps, then failed on json
    (exit 5) without reporting what it had deleted."""
    pickles = [fabricate(tmp_path, T0 - hours(h)) for h in (2, 1, 0)]
    jsons = [fabricate(tmp_path, T0 - hours(h), fmt="json") for h in (1, 0)]

    def dumps() -> dict:
        return {k: v for k, v in files_under(tmp_path).items() if not k.endswith(".lock")}

    before = dumps()
    prune_json = f"cannot prune json dumps in {tmp_path}: .snaptree-export-json.lock is held by"
    with lock_directory(tmp_path, "json"), pytest.raises(snaptree.ExportError, match=prune_json):
        snaptree.prune(tmp_path, Retention(last=1))
    assert dumps() == before
    deleted = [set(r.deleted) for r in snaptree.prune(tmp_path, Retention(last=1))]
    assert deleted == [set(pickles[:2]), {jsons[0]}]


def test_a_directory_named_like_a_dump_is_nobodys_dump(tmp_path):
    """Retention tried to delete it (IsADirectoryError, exit 1, with the deletions before it
    unreported)."""
    older, newest = fabricate(tmp_path, T0 - hours(1)), fabricate(tmp_path, T0)
    odd = fabricate(tmp_path, T0 - hours(2))
    odd.unlink()
    odd.mkdir()
    [result] = snaptree.prune(tmp_path, Retention(last=1))
    assert result.deleted == [older] and newest.exists() and odd.is_dir()


def test_a_damaged_newest_dump_never_leaves_it_the_only_one_kept(tmp_path):
    """The newest dump whose checksum holds is kept too, whatever the policy says."""
    oldest, good, newer, newest = (fabricate(tmp_path, T0 - hours(h)) for h in (3, 2, 1, 0))
    for damaged in (newer, newest):
        damaged.write_bytes(damaged.read_bytes().upper())  # same size, another sha256
    [result] = snaptree.prune(tmp_path, Retention(last=1))
    assert set(result.deleted) == {newer, oldest}  # a damaged dump that is not the newest goes
    [why] = next(d.reasons for d in result.decisions if d.dump.path == good)
    assert "newest dump whose checksum holds" in why
    assert good.exists() and newest.exists()


def test_the_dump_latest_points_at_is_kept_whatever_the_policy(tmp_path):
    older = fabricate(tmp_path, T0 - hours(48))
    newer = fabricate(tmp_path, T0)
    point_latest(tmp_path, "pickle", older)  # as a run that found latest lagging would fix
    [result] = snaptree.prune(tmp_path, Retention(last=1))
    assert older.exists() and newer.exists() and not result.deleted
    assert [d.reasons for d in result.decisions] == [("newest", "last"), ("latest points at it",)]


def test_compressed_and_plain_dumps_of_a_format_are_one_history(tmp_path):
    plain = fabricate(tmp_path, T0 - hours(2))
    compressed = fabricate(tmp_path, T0, compressed=True)
    [result] = snaptree.prune(tmp_path, Retention(last=1))
    assert result.deleted == [plain] and compressed.exists()


def test_a_dry_run_deletes_nothing_and_takes_no_lock(tmp_path, weeks_of_dumps):
    with lock_directory(tmp_path, "pickle"):  # a schedule is running
        before = files_under(tmp_path)
        [result] = snaptree.prune(tmp_path, 2, dry_run=True)
        assert files_under(tmp_path) == before
    assert sum(d.keep for d in result.decisions) == 2 and result.dry_run


def test_prune_command_dry_run_lists_what_would_go_and_why(tmp_path, weeks_of_dumps):
    before = files_under(tmp_path)
    result = run_snaptree("prune", tmp_path, "--keep-daily", "2", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path) == before
    lines = result.stdout.splitlines()
    assert lines[0] == f"pickle dumps in {tmp_path} (daily 2): 2 kept, 124 would delete"
    assert f"keep   {weeks_of_dumps[-1].name}" in lines[1] and "newest; daily" in lines[1]
    assert "day 2026-11-30 has a newer dump kept (daily)" in lines[2]

    as_json = run_snaptree("prune", tmp_path, "--keep-daily", "2", "-n", "--json")
    data = json.loads(as_json.stdout)
    assert data["dry_run"] and data["formats"][0]["policy"] == {"daily": 2}
    assert sum(d["keep"] for d in data["formats"][0]["dumps"]) == 2
    assert files_under(tmp_path) == before


@pytest.mark.slow
def test_prune_command_deletes_under_the_lock_and_is_refused_while_a_schedule_holds_it(
    tmp_path, weeks_of_dumps
):
    with lock_directory(tmp_path, "pickle"):
        refused = run_snaptree("prune", tmp_path, "--keep-last", "1")
    assert refused.returncode == 5
    assert ".snaptree-export-pickle.lock is held by pid" in error_line(refused)
    assert all(p.exists() for p in weeks_of_dumps)
    done = run_snaptree("prune", tmp_path, "--keep-last", "1", "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["formats"][0]["deleted"]) == len(weeks_of_dumps) - 1
    assert [p for p in weeks_of_dumps if p.exists()] == weeks_of_dumps[-1:]


@pytest.mark.slow
def test_prune_without_a_rule_is_a_usage_error(tmp_path, weeks_of_dumps):
    result = run_snaptree("prune", tmp_path)
    assert result.returncode == 2 and "say what to keep" in result.stderr


def test_scheduled_runs_apply_the_policy_by_commit_time(store, tmp_path):
    """All real dumps here were committed within a second: daily 1 keeps only the newest."""
    for value in range(3):
        store.run(lambda root, value=value: root.__setitem__("v", value))
        export_into(store, tmp_path, keep=Retention(within=hours(1)))
    assert len(list(tmp_path.glob("snaptree-*.pickle"))) == 3
    store.run(lambda root: root.__setitem__("v", 99))
    result = export_into(store, tmp_path, keep=Retention(daily=1))
    assert len(result.deleted) == 3
    assert [p.name for p in tmp_path.glob("snaptree-*.pickle")] == [result.info.path.name]
    assert os.readlink(latest_link(tmp_path, "pickle")) == result.info.path.name


@pytest.mark.slow
def test_export_command_takes_the_retention_options(tmp_path):
    db = tmp_path / "Data.fs"
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    with snaptree.open(str(db)) as store:
        for value in range(3):
            store.run(lambda root, value=value: root.__setitem__("v", value))
            result = run_snaptree("export", "--db", db, "--dir", dumps, "--keep-within", "1h")
            assert result.returncode == 0, result.stderr
    with snaptree.open(str(db)) as store:
        store.run(lambda root: root.__setitem__("v", 100))
    result = run_snaptree("export", "--db", db, "--dir", dumps, "--keep-daily", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["deleted"]) == 3
    assert len(list(dumps.glob("snaptree-*.pickle"))) == 1
