"""Hostile input, generated: whatever arrives, the receiver answers 200 or 413 (never a 5xx),
and every callback it answers 200 is either stored or archived as rejected."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from app.config import Settings
from app.main import create_app
from app.store.db import make_engine
from app.store.migrate import upgrade
from app.store.models import Event, Rejected

from ..helpers import make_settings, serving_in_thread

# 200 generated requests per test to a real server (about 9 s each).
pytestmark = pytest.mark.slow
_counter = itertools.count()
CONTENT_TYPES = st.sampled_from([
    None, "application/x-www-form-urlencoded", "application/json", "text/plain",
    "multipart/form-data", "multipart/form-data; boundary=xyz", "application/json; charset=koi8-r",
    "application/x-www-form-urlencoded; charset=cp1251", "image/png", "",
])
FIELD_NAMES = st.sampled_from(["type", "msg_id", "status", "status_extended", "text",
                               "p_transaction_id", "token", "x"])
# Lone UTF-16 surrogates: what a Java or JavaScript serialiser writes when it cuts a string
# between the halves of a pair (JSON "\ud83d"); hypothesis leaves them out of text by default.
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
VALUES = st.one_of(st.text(max_size=50), st.sampled_from(
    ["delivery", "seen", "reply", "delivered", "in process", "BUFFERED", "-2", "0", "99"]),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
    st.text(alphabet=st.one_of(st.characters(), SURROGATES), max_size=20),
    st.tuples(st.sampled_from(["reply", "hi ", "delivered"]), SURROGATES).map("".join))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Engine]]:
    path: Path = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    cfg: Settings = make_settings(database_url=f"sqlite:///{path}", max_callback_bytes=4096)
    engine = make_engine(cfg)
    upgrade(engine)
    with serving_in_thread(create_app(cfg)) as url:
        yield url, engine
    engine.dispose()


def rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(Event)) or 0) + int(
            conn.scalar(select(func.count()).select_from(Rejected)) or 0)


def test_arbitrary_bytes_never_break_the_receiver(fuzz_server: tuple[str, Engine]) -> None:
    url, engine = fuzz_server
    grew: Counter[int] = Counter()

    # Driven from inside the test so that the tally below sees every example.
    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(body=st.binary(max_size=6000), content_type=CONTENT_TYPES,
           query=st.binary(max_size=200), method=st.sampled_from(["GET", "POST"]))
    def check(body: bytes, content_type: str | None, query: bytes, method: str) -> None:
        before = rows(engine)
        headers = {"content-type": content_type} if content_type is not None else {}
        target = f"{url}/dlr?{quote_from_bytes(query, safe='=&+%')}"
        with httpx.Client() as c:
            r = c.request(method, target, headers=headers,
                          content=body if method == "POST" else None)
        assert r.status_code in (200, 413), r.text
        grown = rows(engine) - before
        if r.status_code == 200:
            assert grown in (0, 1)  # 0 only when it repeats a notification already stored
            grew[grown] += 1
        else:
            assert grown == 0

    check()
    # Most of what arrives is junk, archived as rejected: a row each. A receiver that kept
    # nothing would answer 200 and grow no table; it must not pass.
    assert grew[1] > grew[0], grew


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(fields=st.lists(st.tuples(FIELD_NAMES, VALUES), max_size=12),
       encoding=st.sampled_from(["form", "multipart", "json", "query"]))
def test_every_answered_callback_is_stored_or_archived(
    fuzz_server: tuple[str, Engine], fields: list[tuple[str, str]], encoding: str
) -> None:
    url, engine = fuzz_server
    # A fresh msg_id per example, so no example repeats an earlier notification.
    fields = [*fields, ("msg_id", f"fz{next(_counter)}")] if encoding != "json" else fields
    before = rows(engine)
    with httpx.Client() as c:
        if encoding == "form":
            # A lone surrogate goes out as its three (invalid UTF-8) bytes, as Java would.
            r = c.post(f"{url}/dlr", content=urlencode(fields, errors="surrogatepass").encode(),
                       headers={"content-type": "application/x-www-form-urlencoded"})
        elif encoding == "multipart":
            r = c.post(f"{url}/dlr", files=[(k, (None, v.encode("utf-8", "surrogatepass")))
                                            for k, v in fields])
        elif encoding == "query":
            r = c.get(f"{url}/dlr?{urlencode(fields, errors='surrogatepass')}")
        else:
            # ASCII-only JSON, so a lone surrogate travels as a "\udXXX" escape.
            doc = dict(fields) | {"msg_id": f"fz{next(_counter)}"}
            r = c.post(f"{url}/dlr", content=json.dumps(doc).encode(),
                       headers={"content-type": "application/json"})
    assert r.status_code in (200, 413), r.text
    if r.status_code == 200:
        assert rows(engine) - before == 1
