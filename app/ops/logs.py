"""Logging for `dlr serve`: text or one JSON object a line, and no secrets in either.

The callback token can travel in the URL (`/dlr/TOKEN`, `/%64lr/TOKEN`, `?token=`,
`?tok%65n=`), which the access log would print; it is masked before any handler sees it.
`redact_query` masks it in the query strings and form bodies that the rejected archive keeps.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import weakref
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol
from urllib.parse import unquote_to_bytes

# The token path as the log shows it: the raw path, in which any letter of `dlr`, and the
# slash after it, may be percent-encoded (`/%64lr/`, `/dl%72/`, `/DLR%2F`), since the router
# matches the decoded path. Letter case is ignored (near-misses may carry the secret too).
_TOKEN_PATH = re.compile(r"(/(?:d|%64|%44)(?:l|%6c|%4c)(?:r|%72|%52)(?:/|%2f))[^\s?\"]+",
                         re.IGNORECASE)
# A query key inside a log line starts the line or follows `?`, `&`, a blank or a quote, and
# runs to `=`; a value ends at the next `&`, blank or quote (the access log quotes the
# request line).
_QUERY_KEY = re.compile(r"(?:^|[?&\s\"'])([^=&\s\"'?]+)=")
_VALUE_END = re.compile(r"[&\s\"]|$")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}
MASK = b"***"


def _is_token_key(key: bytes) -> bool:
    """Whether a raw urlencoded key names the token: `token`, `tok%65n`, `TOKEN`, ...

    The receiver decodes keys (`%65` is `e`, `+` is a blank) before it looks for `token`, so
    masking must decode them too; letter case is ignored so that near-misses, which may still
    carry the real secret, are masked as well.
    """
    return unquote_to_bytes(key.replace(b"+", b" ")).lower() == b"token"


def redact_query(data: bytes) -> bytes:
    """urlencoded bytes with the value of every `token` parameter replaced by `***`.

    Everything else is kept byte for byte (the rejected archive must show what arrived).
    Pairs are split on `&` only, as the receiver's parser does.
    """
    if b"=" not in data:
        return data
    pairs = data.split(b"&")
    for i, pair in enumerate(pairs):
        key, eq, _ = pair.partition(b"=")
        if eq and _is_token_key(key):
            pairs[i] = key + b"=" + MASK
    return b"&".join(pairs)


def redact(text: str) -> str:
    """A log line with callback tokens masked, in the path and in any query spelling."""
    text = _TOKEN_PATH.sub(r"\1***", text)
    out: list[str] = []
    done = 0  # text[:done] is already in out
    for match in _QUERY_KEY.finditer(text):
        if match.start() < done or not _is_token_key(
                match.group(1).encode("utf-8", "surrogateescape")):
            continue
        end = _VALUE_END.search(text, match.end())
        out += [text[done:match.end()], "***"]
        done = end.start() if end else len(text)
    return "".join(out) + text[done:] if out else text


def _may_hold_token(text: str) -> bool:
    """Cheap test before `redact`: a token needs a `=`, a /dlr/ path or a percent-encoded
    spelling of one. Most access lines (/healthz, lookups, pages without a query) have none
    of these and skip the regexes."""
    return "=" in text or "%" in text or "dlr/" in text or "DLR/" in text.upper()


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(redact(a) if isinstance(a, str) and _may_hold_token(a) else a
                                for a in (record.args if isinstance(record.args, tuple)
                                          else (record.args,)))
        if isinstance(record.msg, str) and _may_hold_token(record.msg):
            record.msg = redact(record.msg)
        return True


class LineFormatter(Protocol):
    """What `AccessLog` needs of a formatter: a whole line from its parts, no LogRecord."""

    def line(self, created: float, level: str, name: str, message: str) -> str: ...


class TextFormatter(logging.Formatter):
    """`time level logger: message`, with the time formatted once a second, not per line
    (strftime was a sixth of an access line's cost)."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def line(self, created: float, level: str, name: str, message: str) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(created))
        return f"{self._stamp},{int((created - second) * 1000):03d} {level} {name}: {message}"

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        text = self.line(record.created, record.levelname, record.name, record.message)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines in batches: a write and a flush per access line were most of its cost
    (the project's /healthz served about half of a bare route's rate with the default access
    log). Lines wait at most FLUSH_SECONDS; a warning or worse, or a full buffer, is written
    at once. The app's shutdown calls `write_through_all`: uvicorn ends a SIGTERM'd or
    SIGINT'd server by raising the signal again with the default action, which kills the
    process before `logging.shutdown` could flush (CI once lost the last requests' lines that
    way), so from then on every line is written as it comes. A SIGKILL loses at most
    FLUSH_SECONDS of lines."""

    FLUSH_SECONDS = 0.2
    MAX_LINES = 512
    _every: ClassVar[weakref.WeakSet[BufferedStreamHandler]] = weakref.WeakSet()

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._through = False
        self._every.add(self)
        threading.Thread(target=self._flusher, name="log-flush", daemon=True).start()

    @classmethod
    def write_through_all(cls) -> None:
        """Write every handler's waiting lines now, and every later line at once."""
        for handler in list(cls._every):
            handler._through = True
            handler.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging never raises into the caller
            self.handleError(record)
            return
        self.append(line, urgent=record.levelno >= logging.WARNING)

    def append(self, line: str, *, urgent: bool = False) -> None:
        """Queue a formatted line; written within FLUSH_SECONDS, or now when `urgent`."""
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line + self.terminator)
            urgent = urgent or self._through or len(self._lines) >= self.MAX_LINES
        if urgent:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._lines:
                lines, self._lines = self._lines, []
                try:
                    self.stream.write("".join(lines))
                except Exception:  # noqa: BLE001 - a closed or broken stream drops the lines
                    return
            super().flush()

    def _flusher(self) -> None:
        while True:
            time.sleep(self.FLUSH_SECONDS)
            if self._lines:
                self.flush()


class JsonFormatter(logging.Formatter):
    """One JSON object a line; `extra=` fields (msg_id, reason, ...) become keys."""

    def line(self, created: float, level: str, name: str, message: str) -> str:
        return json.dumps(self._doc(created, level, name, message), ensure_ascii=False)

    @staticmethod
    def _doc(created: float, level: str, name: str, message: str) -> dict[str, Any]:
        return {"time": datetime.fromtimestamp(created, UTC).isoformat(),
                "level": level.lower(), "logger": name, "message": message}

    def format(self, record: logging.LogRecord) -> str:
        doc = self._doc(record.created, record.levelname, record.name, record.getMessage())
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class AccessLog:
    """The access line of every request, written straight into the log's batch.

    uvicorn logs each response through the logging module: a LogRecord, the filters, the
    formatter and the handler's lock per request cost the trivial route a tenth of its rate
    (measured: /healthz in-process 604k instructions a request with uvicorn's access log,
    543k without it). The protocol (app/ops/http_protocol.py) writes the same line, in the
    configured format and with the token masked, through this instead; where logging is set
    up otherwise (no BufferedStreamHandler of ours), uvicorn's own access log stays on.
    """

    LOGGER = "uvicorn.access"

    def __init__(self, handler: BufferedStreamHandler, formatter: LineFormatter) -> None:
        self.handler = handler
        self.formatter = formatter

    @classmethod
    def configured(cls) -> AccessLog | None:
        """The fast path for the access logger as `log_config` sets it up, or None."""
        logger = logging.getLogger(cls.LOGGER)
        if not logger.isEnabledFor(logging.INFO) or len(logger.handlers) != 1:
            return None
        handler = logger.handlers[0]
        formatter = handler.formatter
        if (not isinstance(handler, BufferedStreamHandler) or logger.filters
                or not isinstance(formatter, TextFormatter | JsonFormatter)
                or any(not isinstance(f, RedactTokens) for f in handler.filters)):
            return None
        return cls(handler, formatter)

    def write(self, client: str, method: str, path: str, version: str, status: int) -> None:
        message = f'{client} - "{method} {path} HTTP/{version}" {status}'
        if _may_hold_token(message):
            message = redact(message)
        self.handler.append(self.formatter.line(time.time(), "INFO", self.LOGGER, message))


def log_config(fmt: str, level: str) -> dict[str, Any]:
    """A dictConfig for uvicorn and the application alike."""
    formatter = {"()": JsonFormatter if fmt == "json" else TextFormatter}
    handler = {"()": BufferedStreamHandler, "formatter": "main",
               "filters": ["redact"], "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactTokens}},
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "loggers": {
            name: {"handlers": ["main"], "level": level.upper(), "propagate": False}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "app")
        },
    }
