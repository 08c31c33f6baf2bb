"""Client-side helpers for Ember's Batches API, over the official ``openai`` SDK.

Used by ``ember batches`` (cluster/cli.py), the batch notebook, the batch benchmark and tests::

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    batch = submit(client, to_jsonl(sample_lines(100, model)))
    batch = watch(client, batch.id, on_update=print)
    rows = results(client, batch)          # output and error lines, by custom_id
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

FINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINT = "/v1/chat/completions"


def sample_lines(n: int, model: str, *, systems: int = 2, system_words: int = 40, max_tokens: int = 8,
                 prefix: str = "req") -> list[dict]:
    """``n`` chat lines whose system prompts cycle through ``systems`` distinct ones (each about
    ``system_words`` words long), so that lines share prefixes as real batch jobs do."""
    prompts = [" ".join(f"rule{s}-{w}" for w in range(system_words)) for s in range(systems)]
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": ENDPOINT,
             "body": {"model": model, "max_tokens": max_tokens,
                      "messages": [{"role": "system", "content": prompts[i % systems]},
                                   {"role": "user", "content": f"question number {i}"}]}}
            for i in range(n)]


def to_jsonl(rows: Iterable[dict | str]) -> bytes:
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows)


def submit(client, data: bytes | str | Path, endpoint: str = ENDPOINT, metadata: dict | None = None,
           filename: str = "batch.jsonl"):
    """Upload a JSONL file (bytes or a path) and create a batch from it; returns the Batch."""
    if not isinstance(data, bytes):
        path = Path(data)
        data, filename = path.read_bytes(), path.name
    f = client.files.create(file=(filename, io.BytesIO(data)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h",
                                 metadata=metadata)


def watch(client, batch_id: str, on_update: Callable[[Any], None] | None = None, poll_s: float = 0.5,
          timeout_s: float | None = None, until: tuple[str, ...] = FINAL):
    """Poll a batch until its status is in ``until``; ``on_update(batch)`` sees every poll."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if on_update is not None:
            on_update(batch)
        if batch.status in until:
            return batch
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} is still {batch.status} after {timeout_s} s")
        time.sleep(poll_s)


def results(client, batch) -> list[dict]:
    """The batch's output and error lines (any order)."""
    rows: list[dict] = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            rows += [json.loads(x) for x in client.files.content(file_id).read().splitlines() if x.strip()]
    return rows


def download(client, batch, path: str | Path) -> int:
    """Write the output and error lines to ``path`` (JSONL); returns how many."""
    rows = results(client, batch)
    Path(path).write_bytes(to_jsonl(rows))
    return len(rows)


class Progress:
    """A progress display for ``watch``: tqdm if installed, else one line per change."""

    def __init__(self, out=None):
        import sys

        self.out = out or sys.stderr
        self._bar = None
        self._last = None
        try:
            from tqdm import tqdm

            self._tqdm = tqdm
        except ImportError:
            self._tqdm = None

    def __call__(self, batch) -> None:
        rc = batch.request_counts
        done, total = (rc.completed + rc.failed, rc.total) if rc else (0, 0)
        if self._tqdm is not None and total:
            if self._bar is None:
                self._bar = self._tqdm(total=total, file=self.out, unit="line")
            self._bar.update(done - self._bar.n)
            self._bar.set_postfix_str(batch.status)
            if batch.status in FINAL:
                self._bar.close()
            return
        state = (batch.status, done, total)
        if state != self._last:
            print(f"{batch.id} {batch.status} {done}/{total}", file=self.out, flush=True)
            self._last = state
