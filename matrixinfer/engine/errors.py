"""Errors an engine reports to whoever submitted a request (torch-free, so the router and the API
server can name them without loading the runtime)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine refuses (the API maps it to HTTP 400; ``param``: the request field to
    name in the error, when it is not the prompt)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineDeadError(RuntimeError):
    """The engine (or, in PDC mode, every instance that could serve the request) is gone (HTTP 503)."""


class RequestFailedError(RuntimeError):
    """Processing one request failed inside the engine; the engine goes on serving the others (HTTP 500)."""
