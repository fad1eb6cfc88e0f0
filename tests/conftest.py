"""Suite-wide rules: a logged traceback is a bug, so any log record carrying
exception info fails the test that produced it (as s3ql's tests do)."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def no_logged_tracebacks(caplog):
    caplog.set_level(logging.INFO)
    yield
    tracebacks = [
        record for record in caplog.get_records("call")
        if record.exc_info and record.name.startswith("dstfuse")
    ]
    if tracebacks:
        lines = "\n".join(f"{r.name}: {r.getMessage()}" for r in tracebacks)
        pytest.fail(f"unexpected traceback logged:\n{lines}", pytrace=False)
