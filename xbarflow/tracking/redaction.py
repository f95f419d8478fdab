"""Credentials never logged: every string a run logs or prints goes through :func:`redact`."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

_SECRET_NAME = re.compile(r"password|passwd|token|secret|credential|api_?key", re.IGNORECASE)
# scheme://user:password@host -> scheme://user:***@host (also as Hydra escapes it in a sweep's
# overrides: scheme\://user\:password@host)
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*\\?://[^:/@\s\\]*)(?P<colon>\\?:)[^@/\s]+@")
# name=value where the name says it is secret: query strings (?token=...) and overrides (a.my_password=...)
# (also inside a printed dict or YAML: 'api_token': 'abc', api_token: abc)
_SECRET_ASSIGNMENT = re.compile(r"(?P<name>[\w.\-+~]*(?:password|passwd|token|secret|credential|api_?key)[\w.\-]*)"
                                r"(?P<sep>['\"]?[ \t]*[=:][ \t]*['\"]?)(?P<value>[^\s&#,;'\"\]}]+)", re.IGNORECASE)
REDACTED = "***"


def redact(text: Any) -> str:
    """``text`` with every credential it carries replaced by ``***``.

    Passwords in URIs (``postgresql://user:***@db/mlflow``), secret query-string
    parameters (``?token=***``) and ``name=value`` pairs whose name says it is secret
    (``logger.api_token=***``). The one function every logged string goes through:
    params, tags, ``config.yaml``, console lines, the sweep table, failure records.
    """
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}{m['colon']}{REDACTED}@", str(text))
    return _SECRET_ASSIGNMENT.sub(lambda m: f"{m['name']}{m['sep']}{REDACTED}", text)


def is_secret_key(key: str) -> bool:
    """A config key whose last component says it holds a secret (``*password*``, ``*token*``, ``*secret*``)."""
    return bool(_SECRET_NAME.search(str(key).split(".")[-1]))


def redact_config(node: Any) -> Any:
    """A plain nested config (dicts, lists, scalars) with secret keys masked and every string redacted."""
    if isinstance(node, dict):
        return {k: (REDACTED if is_secret_key(k) and v is not None else redact_config(v)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact_config(v) for v in node]
    return redact(node) if isinstance(node, str) else node


def config_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, credentials redacted (the run's ``config.yaml`` artifact)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(redact_config(OmegaConf.to_container(cfg, resolve=True))))


def redact_files(folder: Path, pattern: str = "*.yaml") -> None:
    """Rewrite files (Hydra's ``.hydra/*.yaml``, ``multirun.yaml``) with their credentials redacted."""
    for path in Path(folder).glob(pattern):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        clean = redact(text)
        if clean != text:
            # parallel jobs of one sweep may redact the same multirun.yaml at once: write a
            # private copy and rename it over, so no reader ever sees a half-written file
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(clean)
            os.replace(tmp, path)


@contextlib.contextmanager
def redacted_stdout():
    """Redact what MLflow prints meanwhile (its "View run at: URL" line carries the URI as given)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        sys.stdout.write(redact(buffer.getvalue()))
        sys.stdout.flush()


def redact_console_logs() -> None:
    """Redact every log record from now on, in this process (idempotent).

    Hydra's launchers log each job's overrides, and reconfigure the logging handlers
    as they start, so the redaction sits in the record factory, which they keep.
    """
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "redacts", False):
        return

    def redacted_record(*args, **kwargs):
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    redacted_record.redacts = True
    logging.setLogRecordFactory(redacted_record)
