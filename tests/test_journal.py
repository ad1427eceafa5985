"""The crash journal: a killed process loses no call that returned to the app, records wait
on disk when the queue is full, replays never double-count, and no prompt reaches the disk."""

from __future__ import annotations

import marshal
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from sqlalchemy import text

from llm_tally import Tally
from llm_tally._record import ENTRY_VERSION, CallRecord, new_record_id, record_from_entry
from llm_tally.storage.journal import SUFFIX, Journal, Segment, default_directory, read_frames
from llm_tally.storage.schema import upgrade_store

from .conftest import FakeServer
from .servers import free_port, load_then_signal, python_command, serve


def segments_of(tally: Tally) -> list[Path]:
    directory = tally.stats()["journal_dir"]
    assert directory is not None
    return sorted(Path(directory).glob(f"*{SUFFIX}"))


# -- where the journal lives -----------------------------------------------------------------


def test_default_directory_follows_the_database_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLM_TALLY_JOURNAL_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert (
        default_directory(f"sqlite:///{tmp_path}/app.db") == tmp_path / "app.db.llm-tally-journal"
    )
    assert default_directory("sqlite://") is None
    assert default_directory("sqlite:///:memory:") is None
    postgres = default_directory("postgresql+psycopg://u:s3cret@db.example/prod")
    assert postgres is not None and postgres.parent == tmp_path / "state/llm-tally/journal"
    assert "s3cret" not in str(postgres)
    # The same store gets the same directory whatever its password; another store another one.
    assert postgres == default_directory("postgresql+psycopg://u:other@db.example/prod")
    assert postgres != default_directory("postgresql+psycopg://u:s3cret@db.example/test")
    monkeypatch.setenv("LLM_TALLY_JOURNAL_DIR", str(tmp_path / "j"))
    moved = default_directory(f"sqlite:///{tmp_path}/app.db")
    assert moved is not None and moved.parent == tmp_path / "j"


def test_journal_option_is_checked(db_url: str, tmp_path: Path) -> None:
    for bad in ("", 0, 1.5, ["dir"]):
        with pytest.raises(ValueError, match="journal"):
            Tally(db_url, journal=bad)  # type: ignore[arg-type]
    a_file = tmp_path / "not-a-directory"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="journal: cannot use"):
        Tally(db_url, journal=a_file / "journal")
    with Tally(db_url, journal=False) as tally:
        assert tally.stats()["journal_dir"] is None and tally.stats()["journal_bytes"] == 0
    with Tally(db_url, journal=tmp_path / "mine") as tally:
        assert tally.stats()["journal_dir"] == str(tmp_path / "mine")
        assert len(segments_of(tally)) == 1 and tally.stats()["journal_bytes"] > 0


# -- frames ------------------------------------------------------------------------------------


def test_frames_end_at_the_first_torn_or_corrupt_frame(tmp_path: Path) -> None:
    segment = Segment.create(tmp_path, 4096)
    try:
        for n in range(5):
            assert segment.append(f"record {n}".encode(), spilled=n % 2 == 1)
        assert not segment.append(b"x" * 5000, spilled=False)  # does not fit: refused whole
        assert list(segment.frames()) == [f"record {n}".encode() for n in range(5)]
        assert list(segment.frames(only_spilled=True)) == [b"record 1", b"record 3"]
        data = bytearray(segment.map[:])
    finally:
        segment.close(delete=True)
    frame = 8 + len(b"record 0")
    third = 8 + 2 * frame
    torn = bytearray(data)
    torn[third + 10 : third + frame] = bytes(frame - 10)  # killed in the middle of the copy
    assert list(read_frames(bytes(torn))) == [b"record 0", b"record 1"]
    no_header = bytearray(data)
    no_header[third : third + 8] = bytes(8)  # a copy that had not reached the header yet
    assert list(read_frames(bytes(no_header))) == [b"record 0", b"record 1"]
    corrupt = bytearray(data)
    corrupt[third + 8] ^= 0xFF
    assert list(read_frames(bytes(corrupt))) == [b"record 0", b"record 1"]
    assert list(read_frames(b"not a journal" + bytes(data[8:]))) == []


def test_a_journal_entry_holds_every_field_of_a_record() -> None:
    # Every field has a value of its own, so that a field read into the wrong place shows.
    record = CallRecord(
        id=new_record_id(),
        ts_us=1_764_201_600_000_001,
        user_id="user-1",
        properties={"plan": "pro", "feature": "chat"},
        provider="openai",
        operation="chat",
        request_model="gpt-4o-mini",
        response_model="gpt-4o-mini-2024-07-18",
        input_tokens=1,
        output_tokens=2,
        cached_input_tokens=3,
        cache_write_tokens=4,
        reasoning_tokens=5,
        cost_nano_usd=6,
        cost_source="genai-prices",
        latency_us=7,
        ttft_us=8,
        status="error",
        error_type="APIStatusError",
        http_status=500,
        retries=9,
        usage_source="estimated",
        request_id="req_0123",
        base_url="https://example.test/v1",
    )
    payload = marshal.dumps(record.journal_entry(), 2)
    assert record_from_entry(marshal.loads(payload)) == record
    with pytest.raises(ValueError, match="journal entry"):
        record_from_entry((ENTRY_VERSION + 1, *marshal.loads(payload)[1:]))


def test_a_segment_in_use_is_not_replayed_by_another_journal(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    second = Journal(tmp_path)
    try:
        assert list(second.abandoned()) == []  # first's segment is locked by first
        first.close(delete=False)  # ...until it lets go without deleting: it is abandoned
        found = list(second.abandoned())
        assert len(found) == 1 and found[0].path != second.current.path  # type: ignore[union-attr]
        found[0].close(delete=True)
    finally:
        second.close(delete=True)
    assert list(tmp_path.glob(f"*{SUFFIX}")) == []


# -- spilling: the queue is full ---------------------------------------------------------------


def test_a_full_queue_spills_to_the_journal_and_everything_arrives(
    store_url: str, client: openai.OpenAI
) -> None:
    """The store is broken (its table dropped) while 60 calls are made with room for 5 in
    memory: the calls are unaffected, 55 records wait on disk, and all 60 are stored exactly
    once when the store comes back."""
    with Tally(store_url, max_queue=5, flush_interval=0.01) as tally:
        with tally.engine.begin() as conn:
            conn.execute(text("DROP TABLE llm_tally_usage"))
        import llm_tally

        for n in range(30):
            with llm_tally.user(f"u{n % 3}", n=str(n)):
                reply = client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
                assert reply.choices[0].message.content
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "raw"}]
                )
                assert raw.parse().usage is not None
        stats = tally.stats()
        assert stats["spilled"] >= 45 and stats["dropped"] == 0, stats
        assert stats["queue_depth"] <= 2 * 5  # the queue, and the batch being retried
        upgrade_store(tally.engine)
        assert tally.flush(timeout=30)
        stats = tally.stats()
        assert stats["written"] == 60 and stats["replayed"] == stats["spilled"], stats
        assert tally.count_records() == 60
        usage = tally.user_totals("u1")
        assert usage.requests == 20
        # Spilled raw responses were completed before they were journaled: usage is known.
        records = list(tally.iter_records())
        assert {r["usage_source"] for r in records} == {"provider"}
        assert all(r["input_tokens"] > 0 and r["cost_nano_usd"] > 0 for r in records)
    assert not list(Path(stats["journal_dir"]).glob(f"*{SUFFIX}"))  # all stored: deleted


def test_without_a_journal_a_full_queue_drops_and_counts(db_url: str) -> None:
    with Tally(db_url, max_queue=2, flush_interval=0.01, journal=False) as tally:
        with tally.engine.begin() as conn:
            conn.execute(text("DROP TABLE llm_tally_usage"))
        started = time.perf_counter()
        for _ in range(10):
            tally.record(user_id="u", model="gpt-4o-mini", input_tokens=1)
        assert time.perf_counter() - started < 5
        assert tally.stats()["dropped"] >= 6 and tally.stats()["spilled"] == 0
        upgrade_store(tally.engine)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MiB filesystem (tmpfs): room for one 4 MiB journal segment, not two."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_queue_and_disk_both_full_drop_with_a_count_and_never_block(
    db_url: str, tiny_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Tally(db_url, max_queue=10, flush_interval=0.01, journal=tiny_disk) as tally:
        with tally.engine.begin() as conn:
            conn.execute(text("DROP TABLE llm_tally_usage"))
        started = time.perf_counter()
        for n in range(40_000):
            tally.record(user_id=f"u{n % 10}", model="gpt-4o-mini", input_tokens=1)
        assert time.perf_counter() - started < 60
        stats = tally.stats()
        assert stats["journal_errors"] >= 1 and "No space" in stats["last_journal_error"]
        assert stats["spilled"] > 10_000 and stats["dropped"] > 0, stats
        in_memory = 40_000 - stats["spilled"] - stats["dropped"]
        assert 0 < in_memory <= 2 * 10  # the queue and the batch being retried
        assert "dropped so far" in caplog.text and "wait in the journal" in caplog.text
        upgrade_store(tally.engine)
        assert tally.flush(timeout=60)
        assert tally.count_records() == 40_000 - stats["dropped"]


# -- crashes -----------------------------------------------------------------------------------


def test_a_process_that_dies_after_storing_is_replayed_without_double_counting(
    store_url: str,
) -> None:
    """A process stores 300 calls, then exits without cleaning up (os._exit): its journal still
    holds all 300. The next Tally replays them and each is stored once."""
    script = textwrap.dedent(
        """
        import os, sys
        from llm_tally import Tally
        tally = Tally(sys.argv[1], instrument=False)
        for n in range(300):
            tally.record(user_id=f"u{n % 4}", model="gpt-4o-mini", input_tokens=10,
                         output_tokens=5, cost_usd="0.001", properties={"n": str(n)})
        assert tally.flush(30)
        print(tally.stats()["journal_dir"])
        os._exit(0)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, store_url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    left = list(Path(done.stdout.strip()).glob(f"*{SUFFIX}"))
    assert left  # the dead process's segment (and maybe its spare), never deleted
    with Tally(store_url, instrument=False) as tally:
        assert tally.flush(30)
        stats = tally.stats()
        assert tally.count_records() == 300
        assert tally.user_totals("u1").cost_usd == Decimal("0.075")
        assert stats["replayed"] == 0  # all were stored already: nothing new
    assert not any(path.exists() for path in left)


def kill_under_load(db_url: str, llm_url: str, journal: str = "on") -> set[str]:
    """Serve tests.served_app in uvicorn with a 30 s flush interval (nothing is stored before
    the kill: only the journal can save the calls), call it from 8 threads, plain calls and
    streams, and SIGKILL it once 300 calls were answered; the ``n`` of every answered call."""
    port = free_port()
    command = python_command(
        "-m", "uvicorn", "--factory", "tests.served_app:make_fastapi_app", "--port", str(port)
    )
    env = {
        "TEST_DB_URL": db_url,
        "TEST_LLM_URL": llm_url,
        "TEST_FLUSH_INTERVAL": "30",
        "TEST_JOURNAL": journal,
    }
    with serve(command, port, env) as server:
        server.wait_ready()
        kinds = ("chat", "chat", "chat_stream")
        answered, _ = load_then_signal(
            server,
            lambda n: f"/ask?n={n}&user=user-{n % 7}&kind={kinds[n % 3]}",
            answered_before_signal=300,
            sig=signal.SIGKILL,
        )
    return answered


def test_kill_9_under_load_loses_no_call_that_returned_to_the_app(
    store_url: str, fake_llm: FakeServer
) -> None:
    answered = kill_under_load(store_url, fake_llm.base_url)
    with Tally(store_url, instrument=False) as tally:
        assert tally.flush(60)
        records = list(tally.iter_records())
        stats = tally.stats()
    stored = [record["properties"]["n"] for record in records]
    assert len(stored) == len(set(stored)), "a call was stored twice"
    missing = answered - set(stored)
    assert not missing, f"{len(missing)} of {len(answered)} answered calls lost"
    assert stats["replayed"] >= len(answered)  # they came from the journal, not the writer
    usage = {r["properties"]["n"]: (r["input_tokens"], r["status"]) for r in records}
    assert all(usage[n][1] == "ok" and usage[n][0] > 0 for n in answered), usage


def test_without_the_journal_kill_9_loses_calls(db_url: str, fake_llm: FakeServer) -> None:
    """The control experiment: the same kill with the journal off loses answered calls."""
    answered = kill_under_load(db_url, fake_llm.base_url, journal="off")
    with Tally(db_url, instrument=False) as tally:
        assert tally.flush(60)
        stored = {record["properties"]["n"] for record in tally.iter_records()}
    assert len(answered - stored) > 0


# -- privacy -----------------------------------------------------------------------------------


def test_the_journal_never_holds_prompts_or_outputs(db_url: str, client: openai.OpenAI) -> None:
    import llm_tally

    secret_prompt = "PROMPT-SECRET-7f3a"
    with Tally(db_url, max_queue=1, flush_interval=30) as tally:
        outputs = []
        with llm_tally.user("alice"):
            for _ in range(3):  # the first is queued, the others spilled (completed first)
                reply = client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": secret_prompt}]
                )
                outputs.append(reply.choices[0].message.content or "")
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": secret_prompt}],
                stream=True,
            )
            for _ in stream:
                pass
        journal = b"".join(path.read_bytes() for path in segments_of(tally))
        assert journal.count(b"alice") == 4  # the calls are there...
        assert secret_prompt.encode() not in journal  # ...their prompts and outputs are not
        assert all(len(text) > 20 and text.encode() not in journal for text in outputs)


def test_a_tally_created_before_fork_records_in_each_child(store_url: str) -> None:
    """gunicorn --preload forks workers after the app (and its Tally) exist: each child gets
    its own writer thread, connections and journal files, and loses nothing."""
    script = textwrap.dedent(
        """
        import os, sys
        from llm_tally import Tally
        tally = Tally(sys.argv[1], instrument=False)
        tally.record(user_id="parent", model="gpt-4o-mini", input_tokens=1, cost_usd="0.01")
        children = []
        for child in range(3):
            pid = os.fork()
            if pid == 0:
                for n in range(200):
                    tally.record(user_id=f"child-{child}", model="gpt-4o-mini",
                                 input_tokens=1, cost_usd="0.01")
                tally.close()  # what atexit does; os._exit skips it here to be explicit
                os._exit(0)
            children.append(pid)
        codes = [os.waitpid(pid, 0)[1] for pid in children]
        tally.close()
        print(tally.stats()["journal_dir"], codes)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, store_url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    directory, codes = done.stdout.split(" ", 1)
    assert codes.strip() == "[0, 0, 0]"
    assert not list(Path(directory).glob(f"*{SUFFIX}"))  # every process cleaned up its own
    with Tally(store_url, instrument=False, journal=False) as tally:
        assert tally.count_records() == 601
        assert [tally.user_totals(f"child-{c}").requests for c in range(3)] == [200] * 3
        assert tally.user_totals("parent").cost_usd == Decimal("0.01")


def test_only_stale_unfinished_segments_are_cleaned_up(tmp_path: Path) -> None:
    """A segment is opened, then locked: another process must not delete it in between."""
    fresh, stale = tmp_path / ".fresh.tmp", tmp_path / ".stale.tmp"
    fresh.write_bytes(b"")
    stale.write_bytes(b"")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    journal = Journal(tmp_path)
    try:
        assert list(journal.abandoned()) == []
        assert fresh.exists() and not stale.exists()
    finally:
        journal.close(delete=True)
