"""Operations: logs without secrets, JSON log lines, restricted /metrics and /docs."""

from __future__ import annotations

import json
import logging

from app.ops.logs import JsonFormatter, RedactTokens, redact

from ..helpers import AppFactory, client_for


def test_callback_tokens_are_masked_in_logs() -> None:
    line = '127.0.0.1:5000 - "GET /dlr/s3cret?type=seen&token=s3cret&msg_id=1 HTTP/1.1" 200'
    assert "s3cret" not in redact(line)
    assert '"GET /dlr/***?type=seen&token=***&msg_id=1 HTTP/1.1"' in redact(line)
    record = logging.makeLogRecord({"msg": '%s - "%s %s"', "args": ("1.2.3.4", "GET",
                                                                   "/dlr?token=abc&x=1")})
    RedactTokens().filter(record)
    assert record.getMessage() == '1.2.3.4 - "GET /dlr?token=***&x=1"'


def test_json_log_lines_carry_the_extra_fields() -> None:
    record = logging.makeLogRecord({"msg": "not stored, answered 503: %s", "args": ("down",),
                                    "levelname": "WARNING", "name": "app.receive.callbacks",
                                    "msg_id": "abc-1"})
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "not stored, answered 503: down"
    assert (doc["level"], doc["msg_id"], doc["logger"]) == (
        "warning", "abc-1", "app.receive.callbacks")


async def test_metrics_and_docs_can_be_restricted(app_with: AppFactory) -> None:
    app = await app_with(restrict_metrics=True, restrict_docs=True, api_keys="k1")
    async with client_for(app, peer="192.0.2.1") as c:
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert (await c.get(path)).status_code == 401, path
            assert (await c.get(path, headers={"X-API-Key": "k1"})).status_code == 200, path
        assert (await c.get("/healthz")).status_code == 200  # probes stay open
