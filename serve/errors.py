"""The serving room's errors, on both sides of the HTTP API.

Service side: ``UploadError`` is a request the service refuses because of what the client sent:
``status`` (4xx), ``field`` (the form field) and a ``message`` that names the field and never a
server path; ``QueueFullError`` (in :mod:`serve.jobs`) is the job queue at its bound.
Client side: ``ClientError`` and its kinds (in :mod:`serve.client`) are failed requests or jobs.
"""
from __future__ import annotations


class ServeError(Exception):
    """Any error of the serving room: one the service turns into an HTTP answer, or one the
    client raises for an answer it got (or did not get)."""


class ServeConfigError(ServeError, ValueError):
    """A ``serve.*`` setting the service cannot start with (no model, a queue bound below 1)."""


class UploadError(ServeError, ValueError):
    """A request the service refuses: ``status`` (4xx), ``field`` (form field), ``message``."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "error": f"{self.field}: {self.message}"}
