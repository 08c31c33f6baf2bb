"""The Files and Batches API through the unmodified openai SDK, on SimEngine (memory:// store, the
runner inside the ingress). Every body is checked against OpenAI's published schemas."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest

from cluster.batch_client import results, sample_lines, to_jsonl, watch
from cluster.cli import main as cli
from policies.pricing import Price, request_cost
from tests.conftest import ADMIN_TOKEN, DEMO_KEY, SIM_MODEL



def lines(n: int, model: str = SIM_MODEL, max_tokens: int = 4) -> list[dict]:
    return sample_lines(n, model, max_tokens=max_tokens)


def upload(client, rows) -> "openai.types.FileObject":
    return client.files.create(file=("in.jsonl", io.BytesIO(to_jsonl(rows))), purpose="batch")


def wait(client, batch_id: str, timeout_s: float = 60, schema=None):
    """Until the batch is final, checking every poll's raw body against ``schema``."""
    def poll(_):
        if schema is not None:
            schema.validate(client.batches.with_raw_response.retrieve(batch_id).http_response.json())

    return watch(client, batch_id, on_update=poll, poll_s=0.1, timeout_s=timeout_s)


def usage_batch(client) -> dict:
    rows = client.get("/usage", cast_to=httpx.Response).json()["data"]
    out = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    for r in rows:
        for k in out:
            out[k] += r["batch"][k]
    return out


def test_sdk_upload_create_retrieve_download_with_schema_valid_bodies_and_half_price(client, openai_schemas):
    before = usage_batch(client)
    raw = client.files.with_raw_response.create(file=("in.jsonl", io.BytesIO(to_jsonl(lines(12)))), purpose="batch")
    openai_schemas("OpenAIFile").validate(raw.http_response.json())
    f = raw.parse()
    assert f.purpose == "batch" and f.bytes == len(to_jsonl(lines(12)))
    assert client.files.retrieve(f.id).filename == "in.jsonl"
    listed = client.files.with_raw_response.list()
    openai_schemas("ListFilesResponse").validate(listed.http_response.json())
    assert f.id in [x.id for x in listed.parse().data]
    assert client.files.content(f.id).read() == to_jsonl(lines(12))

    raw = client.batches.with_raw_response.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                  completion_window="24h", metadata={"job": "nightly"})
    openai_schemas("Batch").validate(raw.http_response.json())
    created = raw.parse()
    assert created.status == "validating" and created.metadata == {"job": "nightly"}
    batch = wait(client, created.id, schema=openai_schemas("Batch"))
    assert batch.status == "completed", batch
    assert batch.request_counts.total == batch.request_counts.completed == 12 and batch.request_counts.failed == 0
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.error_file_id is None
    out_file = client.files.retrieve(batch.output_file_id)
    assert out_file.purpose == "batch_output"

    out_schema, chat_schema = openai_schemas("BatchRequestOutput"), openai_schemas("CreateChatCompletionResponse")
    rows = results(client, batch)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"req-{i}" for i in range(12))
    price = Price(0.20, 0.10, 0.20)  # the default standard row, cached input at half
    expected_cost = 0.0
    for r in rows:
        out_schema.validate(r)
        chat_schema.validate(r["response"]["body"])
        assert r["response"]["status_code"] == 200 and r["error"] is None
        u = r["response"]["body"]["usage"]
        assert u["completion_tokens"] == 4
        expected_cost += request_cost(price, u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"],
                                      u["completion_tokens"], discount=0.5)
    # Lines sharing a system prompt went to one replica after their group's first line: cache hits.
    assert sum(r["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] for r in rows) > 0
    after = usage_batch(client)
    assert after["requests"] - before["requests"] == 12
    assert after["cost_usd"] - before["cost_usd"] == pytest.approx(expected_cost, rel=1e-4, abs=1e-8)

    deleted = client.files.with_raw_response.delete(f.id)
    openai_schemas("DeleteFileResponse").validate(deleted.http_response.json())
    assert deleted.parse().deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_batches_list_pages_newest_first(client, openai_schemas):
    f = upload(client, lines(1))
    ids = [client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id for _ in range(3)]
    raw = client.batches.with_raw_response.list(limit=2)
    openai_schemas("ListBatchesResponse").validate(raw.http_response.json())
    page = raw.parse()
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    rest = client.batches.list(limit=2, after=page.data[-1].id)
    assert rest.data[0].id == ids[0]
    for bid in ids:
        assert wait(client, bid).status == "completed"


@pytest.mark.parametrize("rows, line, code", [
    (lines(3)[:2] + ["{oops"], 3, "invalid_json_line"),
    (lines(3) + [lines(1)[0]], 4, "duplicate_custom_id"),
    (lines(2) + [{**lines(3)[2], "body": {**lines(3)[2]["body"], "model": "accounts/ember/models/nope"}}],
     3, "mismatched_model"),
    ([{**r, "body": {**r["body"], "model": "accounts/ember/models/nope"}} for r in lines(2)], 1, "model_not_found"),
    (lines(1) + [{**lines(2)[1], "body": {**lines(2)[1]["body"], "temperature": 9}}], 2, "invalid_parameter"),
    (lines(1) + [{**lines(2)[1], "body": {**lines(2)[1]["body"], "max_tokens": 10_000}}], 2, None),
])
def test_a_bad_file_fails_with_line_numbered_errors_and_bills_nothing(client, openai_schemas, rows, line, code):
    before = usage_batch(client)
    f = upload(client, rows)
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait(client, batch.id, schema=openai_schemas("Batch"))
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    errors = batch.errors.data
    assert errors and errors[0].line == line, errors
    if code is not None:
        assert errors[0].code == code, errors
    assert usage_batch(client) == before


def test_bad_batch_requests_are_clean_4xx(client):
    f = upload(client, lines(1))
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("in.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")


def test_another_accounts_files_and_batches_are_404(client, serve_instance):
    def admin(*args):
        out = io.StringIO()
        import contextlib

        with contextlib.redirect_stdout(out):
            assert cli(["--url", serve_instance, "--admin-token", ADMIN_TOKEN, *args]) == 0
        return json.loads(out.getvalue())

    admin("accounts", "create", "batch-stranger")
    other = openai.OpenAI(base_url=str(client.base_url), api_key=admin("keys", "create", "batch-stranger")["key"],
                          max_retries=0, timeout=30)
    f = upload(client, lines(2))
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: other.files.retrieve(f.id), lambda: other.files.content(f.id),
                 lambda: other.files.delete(f.id), lambda: other.batches.retrieve(batch.id),
                 lambda: other.batches.cancel(batch.id),
                 lambda: other.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert f.id not in [x.id for x in other.files.list().data]
    assert batch.id not in [b.id for b in other.batches.list().data]
    assert wait(client, batch.id).status == "completed"
    assert client.files.retrieve(f.id).id == f.id  # still there: the stranger's delete did nothing


def test_ember_batches_cli_submits_watches_and_downloads(serve_instance, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(to_jsonl(lines(5)))
    base = ["--url", serve_instance, "--api-key", DEMO_KEY, "batches"]
    assert cli([*base, "submit", str(src), "--watch", "--out", str(out)]) == 0
    batch_id = capsys.readouterr().out.split()[0]
    assert batch_id.startswith("batch_")
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == [f"req-{i}" for i in range(5)]
    assert cli([*base, "list"]) == 0 and batch_id in capsys.readouterr().out
    assert cli([*base, "download", batch_id, str(tmp_path / "again.jsonl")]) == 0
    assert len((tmp_path / "again.jsonl").read_text().splitlines()) == 5
    assert cli([*base, "cancel", "batch_nope"]) == 1
