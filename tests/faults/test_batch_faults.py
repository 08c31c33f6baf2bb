"""Batches on a shared store (real Redis) while the runner dies, and cancelled mid-run.

The invariant: every line's result is stored once and billed once (the ledger counts one batch
event per line), whatever dies; a cancelled batch stops within seconds and keeps what completed.
"""

from __future__ import annotations

import os
import shutil
import time

import openai
import pytest

from cluster.batch_client import results, sample_lines, submit, to_jsonl, watch
from tests.conftest import DEMO_KEY
from tests.faults.drivers import usage_totals
from tests.faults.harness import FAULT_MODEL, PrivateRedis, fault_config

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="module")
def store_url():
    """A redis-server of this module's own: the ledger counts below see no other run's batches
    (a runner resumes every active batch in its store, whoever left it there)."""
    if shutil.which("redis-server") is None:
        yield REDIS_URL
        return
    r = PrivateRedis()
    r.start()
    yield r.url
    r.cleanup()


@pytest.fixture(scope="module")
def app(deploy, store_url):
    return deploy("batchfaults", fault_config(store=store_url, seqs=4))


@pytest.fixture()
def client(app):
    return openai.OpenAI(base_url=app.base, api_key=DEMO_KEY, max_retries=2, timeout=60)


def _batch_events(app) -> int:
    return usage_totals(app.base).get("batch_requests", 0)  # no rows yet: no key


class _Reached(Exception):
    pass


def _run_until(client, batch_id: str, completed: int) -> None:
    """Return once at least ``completed`` lines have completed (the batch still running)."""
    def check(batch):
        if batch.request_counts and batch.request_counts.completed >= completed:
            raise _Reached
        assert batch.status == "in_progress" or batch.status == "validating", batch

    with pytest.raises(_Reached):
        watch(client, batch_id, on_update=check, poll_s=0.05, timeout_s=60)


def test_killing_the_runner_mid_batch_loses_no_line_and_runs_none_twice(app, client):
    n = 120
    before = _batch_events(app)
    batch = submit(client, to_jsonl(sample_lines(n, FAULT_MODEL, max_tokens=8, systems=3)))
    _run_until(client, batch.id, 20)
    app.kill_batch_runner()
    batch = watch(client, batch.id, poll_s=0.2, timeout_s=120)
    assert batch.status == "completed", batch
    rows = results(client, batch)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"req-{i}" for i in range(n))
    assert all(r["response"]["status_code"] == 200 for r in rows)
    assert batch.request_counts.completed == n and batch.request_counts.failed == 0
    assert _batch_events(app) - before == n  # one ledger event per line


def test_cancel_reaches_cancelled_within_seconds_and_keeps_completed_lines(app, client):
    n = 400
    batch = submit(client, to_jsonl(sample_lines(n, FAULT_MODEL, max_tokens=30, prefix="c")))
    _run_until(client, batch.id, 10)
    started = time.monotonic()
    client.batches.cancel(batch.id)
    batch = watch(client, batch.id, poll_s=0.05, timeout_s=10)
    took = time.monotonic() - started
    assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at
    assert took < 10
    rows = results(client, batch)
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)) == batch.request_counts.completed >= 10
    assert batch.request_counts.completed < n


def test_a_cancelled_batch_bills_exactly_the_lines_in_its_output(app, client):
    """Cancel while lines are finishing (short lines, every slot busy): a line that finished in the
    engine as the cancel arrived is either in the output and billed, or in neither."""
    for round_ in range(3):
        before = _batch_events(app)
        batch = submit(client, to_jsonl(sample_lines(300, FAULT_MODEL, max_tokens=2, prefix=f"x{round_}")))
        _run_until(client, batch.id, 20 + 15 * round_)
        client.batches.cancel(batch.id)
        batch = watch(client, batch.id, poll_s=0.05, timeout_s=30)
        assert batch.status == "cancelled", batch
        app.wait_idle()  # every line that was running has ended (and any usage of it is written)
        rows = results(client, batch)
        answered = [r for r in rows if r["response"] and r["response"]["status_code"] == 200]
        assert len({r["custom_id"] for r in answered}) == len(answered) == batch.request_counts.completed
        assert _batch_events(app) - before == len(answered), f"round {round_}"
