"""Unit tests of the ledger's group commit (chunkstore._GroupCommit) on a real SQLite file.

Writers that arrive while another is writing share that one's transaction and one COMMIT
(one fsync); alone, a writer commits at once. Every test makes the grouping happen on
purpose: the first writer holds the connection (it waits on an event inside its
statements) until the others are counted as waiting, so the number of COMMITs is exact.
"""
from __future__ import annotations

import os
import sqlite3
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from chunkstore import LEDGER_GROUP_MAX, _GroupCommit  # noqa: E402
from conftest import wait_until  # noqa: E402

JOIN_TIMEOUT_S = 20.0


class _Connection:
    """A real SQLite connection whose own statements (COMMIT, SAVEPOINT, ...) can be made to
    fail, as a full disk makes them: `fail[statement] = exception`."""

    def __init__(self, db):
        self._db = db
        self.fail = {}

    def execute(self, sql, *args):
        if sql in self.fail:
            raise self.fail[sql]
        return self._db.execute(sql, *args)

    @property
    def in_transaction(self):
        return self._db.in_transaction

    def close(self):
        self._db.close()


@pytest.fixture
def ledger(tmp_path):
    path = str(tmp_path / "ledger.sqlite3")
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE rows (name TEXT PRIMARY KEY)")
    setup.close()
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    commits = []
    db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    connection = _Connection(db)
    group = _GroupCommit(connection)
    group.path, group.commits, group.connection = path, commits, connection
    yield group
    group.close()


def committed(group):
    """The rows another connection sees: only what was committed."""
    reader = sqlite3.connect(group.path)
    try:
        return sorted(row[0] for row in reader.execute("SELECT name FROM rows"))
    finally:
        reader.close()


def insert(group, name, fail=None):
    with group.transaction() as db:
        db.execute("INSERT INTO rows (name) VALUES (?)", (name,))
        if fail is not None:
            raise fail


class Writers:
    """Writer threads, each recording what it saw once its transaction had returned (or the
    exception it raised)."""

    def __init__(self, group):
        self.group = group
        self.threads = []
        self.outcomes = {}          # name -> "committed", "not visible" or the exception

    def start(self, name, body=None, fail=None):
        def run():
            try:
                if body is None:
                    insert(self.group, name, fail)
                else:
                    body()
            except BaseException as error:    # the test reads it from outcomes
                self.outcomes[name] = error
                return
            # Returned: its row must already be committed, seen from another connection.
            self.outcomes[name] = "committed" if name in committed(self.group) \
                else "not visible"
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self):
        for thread in self.threads:
            thread.join(JOIN_TIMEOUT_S)
        assert not [t for t in self.threads if t.is_alive()], "a writer never returned"


def holding_writer(group, writers, name="first", wait_inside=True):
    """Start a writer that stops inside its transaction until the returned event is set
    (and, with `wait_inside`, return once it is inside; else return (inside, release))."""
    inside, release = threading.Event(), threading.Event()

    def body():
        with group.transaction() as db:
            db.execute("INSERT INTO rows (name) VALUES (?)", (name,))
            inside.set()
            assert release.wait(JOIN_TIMEOUT_S)
    writers.start(name, body=body)
    if not wait_inside:
        return inside, release
    assert inside.wait(JOIN_TIMEOUT_S)
    return release


def waiting(group):
    """Writers that arrived and wait for the connection."""
    with group._arrivals:
        return group._arrived - group._entered


def arrive(group, writers, names, fail=None):
    """Start writers that queue behind the holding one; return once all are counted."""
    for name in names:
        writers.start(name, fail=fail)
    wait_until(lambda: waiting(group) == len(names), message="the writers to queue")


def test_a_writer_alone_commits_at_once(ledger):
    insert(ledger, "alone")
    assert ledger.commits == ["COMMIT"]
    assert committed(ledger) == ["alone"]


@pytest.mark.parametrize("writers_count, expected_commits", [
    (2, 1),
    (LEDGER_GROUP_MAX, 1),                 # at the limit: one transaction holds them all
    (LEDGER_GROUP_MAX + 1, 2),             # past it: the last one commits on its own
], ids=["two", "at-the-limit", "past-the-limit"])
def test_writers_that_wait_share_one_commit(ledger, writers_count, expected_commits):
    writers = Writers(ledger)
    release = holding_writer(ledger, writers)
    names = ["w%03d" % i for i in range(writers_count - 1)]
    arrive(ledger, writers, names)
    release.set()
    writers.join()
    assert len(ledger.commits) == expected_commits
    assert writers.outcomes == dict.fromkeys(["first"] + names, "committed")
    assert committed(ledger) == sorted(["first"] + names)


def test_a_writer_that_arrives_later_does_not_keep_the_transaction_open(ledger):
    """The transaction waits for the writers that were waiting when its first one finished,
    not for those that come after: they get the next commit (a steady stream of them would
    otherwise keep the first writer waiting for as long as it lasted)."""
    writers = Writers(ledger)
    release_first = holding_writer(ledger, writers, "first")
    second_inside, release_second = holding_writer(ledger, writers, "second",
                                                   wait_inside=False)
    wait_until(lambda: waiting(ledger) == 1, message="the second writer to queue")
    release_first.set()                             # "first" waits for "second" only
    assert second_inside.wait(JOIN_TIMEOUT_S)
    arrive(ledger, writers, ["later"])              # arrives while "second" writes
    release_second.set()
    writers.join()
    assert writers.outcomes == dict.fromkeys(["first", "second", "later"], "committed")
    assert len(ledger.commits) == 2                 # first + second, then later alone


def test_a_failing_writer_undoes_only_its_own_and_commits_for_those_waiting(ledger):
    """The writer that fails is the last to arrive: it still commits the first's row."""
    writers = Writers(ledger)
    release = holding_writer(ledger, writers)
    arrive(ledger, writers, ["failing"], fail=ValueError("bad input"))
    release.set()
    writers.join()
    assert isinstance(writers.outcomes["failing"], ValueError)
    assert writers.outcomes["first"] == "committed"
    assert committed(ledger) == ["first"]
    assert ledger.commits == ["COMMIT"]


def test_a_failing_writer_among_others(ledger):
    writers = Writers(ledger)
    release = holding_writer(ledger, writers)
    arrive(ledger, writers, ["ok-1", "ok-2"])
    writers.start("failing", fail=ValueError("bad input"))
    wait_until(lambda: waiting(ledger) == 3, message="the failing writer to queue")
    release.set()
    writers.join()
    assert isinstance(writers.outcomes.pop("failing"), ValueError)
    assert writers.outcomes == dict.fromkeys(["first", "ok-1", "ok-2"], "committed")
    assert committed(ledger) == ["first", "ok-1", "ok-2"]


def test_a_writer_alone_that_fails_leaves_nothing(ledger):
    with pytest.raises(ValueError):
        insert(ledger, "failing", fail=ValueError("bad input"))
    assert committed(ledger) == [] and ledger.commits == []
    insert(ledger, "next")                         # no transaction was left open
    assert committed(ledger) == ["next"]


def test_a_failed_commit_is_raised_in_every_writer_of_its_transaction(ledger):
    writers = Writers(ledger)
    release = holding_writer(ledger, writers)
    arrive(ledger, writers, ["second", "third"])
    ledger.connection.fail["COMMIT"] = sqlite3.OperationalError("database or disk is full")
    release.set()
    writers.join()
    assert set(writers.outcomes) == {"first", "second", "third"}
    for error in writers.outcomes.values():
        assert isinstance(error, sqlite3.OperationalError)
        assert "database or disk is full" in str(error)
    assert committed(ledger) == []
    del ledger.connection.fail["COMMIT"]
    insert(ledger, "after")                        # rolled back: the connection is reusable
    assert committed(ledger) == ["after"]


@pytest.mark.parametrize("statement", ["SAVEPOINT writer", "RELEASE writer"])
def test_a_joining_writer_whose_savepoint_fails(ledger, statement):
    """SAVEPOINT fails: the writer has nothing in the transaction, raises, and (the last to
    arrive) commits the first writer's row. RELEASE fails: the transaction is in doubt, so
    nobody's statements commit and both writers raise."""
    writers = Writers(ledger)
    release = holding_writer(ledger, writers)
    arrive(ledger, writers, ["joining"])
    ledger.connection.fail[statement] = sqlite3.OperationalError("disk I/O error")
    release.set()
    writers.join()
    del ledger.connection.fail[statement]
    assert isinstance(writers.outcomes["joining"], sqlite3.OperationalError)
    if statement == "SAVEPOINT writer":
        assert writers.outcomes["first"] == "committed"
        assert committed(ledger) == ["first"]
    else:
        assert isinstance(writers.outcomes["first"], sqlite3.OperationalError)
        assert committed(ledger) == []
    insert(ledger, "after")
    assert "after" in committed(ledger)


def test_closing_tells_a_writer_that_waits_for_its_commit(ledger):
    """A writer waiting for one that will never come (the server stopping) is not left
    hanging: close() rolls the transaction back and the writer raises."""
    writers = Writers(ledger)
    with ledger._arrivals:
        ledger._arrived += 1                       # as if a writer had arrived
    writers.start("waiting")
    wait_until(lambda: ledger._open is not None and ledger._open.writers == 1,
               message="the writer to wait for its commit")
    ledger.close()
    writers.join()
    assert isinstance(writers.outcomes["waiting"], sqlite3.ProgrammingError)
    assert committed(ledger) == []
    with pytest.raises(sqlite3.ProgrammingError):
        insert(ledger, "closed")


# -- unsynced writers (a chunk its file records: chunkstore's "Chunk records") ---------------

def synchronous_inside(group, synced, name, inside=None, release=None):
    """One writer's transaction (`synced` or not); returns the connection's synchronous
    setting as its statements saw it (1 NORMAL, 2 FULL)."""
    with group.transaction(synced) as db:
        db.execute("INSERT INTO rows (name) VALUES (?)", (name,))
        level = db.execute("PRAGMA synchronous").fetchone()[0]
        if inside is not None:
            inside.set()
            assert release.wait(JOIN_TIMEOUT_S)
    return level


def test_an_unsynced_writer_commits_normal_at_once_and_the_next_synced_one_full(ledger):
    assert synchronous_inside(ledger, False, "unsynced") == 1
    assert synchronous_inside(ledger, True, "synced") == 2
    assert synchronous_inside(ledger, False, "again") == 1
    assert ledger.commits == ["COMMIT"] * 3
    assert committed(ledger) == ["again", "synced", "unsynced"]


def test_an_unsynced_writer_shares_its_commit_with_nobody(ledger):
    """There is no sync to share: it commits as soon as its statements are done, and those
    that queued meanwhile share the next, synced, commit."""
    writers = Writers(ledger)
    inside, release = threading.Event(), threading.Event()
    levels = {}
    writers.start("unsynced", body=lambda: levels.update(
        unsynced=synchronous_inside(ledger, False, "unsynced", inside, release)))
    assert inside.wait(JOIN_TIMEOUT_S)
    arrive(ledger, writers, ["w1", "w2"])
    release.set()
    writers.join()
    assert levels == {"unsynced": 1}
    assert len(ledger.commits) == 2            # the unsynced one alone, then w1 + w2
    assert writers.outcomes == dict.fromkeys(["unsynced", "w1", "w2"], "committed")


def test_an_unsynced_writer_joins_a_synced_transaction_that_is_open(ledger):
    writers = Writers(ledger)
    release = holding_writer(ledger, writers)
    levels = {}
    writers.start("unsynced", body=lambda: levels.update(
        unsynced=synchronous_inside(ledger, False, "unsynced")))
    wait_until(lambda: waiting(ledger) == 1, message="the unsynced writer to queue")
    release.set()
    writers.join()
    assert levels == {"unsynced": 2}           # its statements are synced with the others'
    assert ledger.commits == ["COMMIT"]
    assert writers.outcomes == dict.fromkeys(["first", "unsynced"], "committed")
