"""Placeholder, replaced by the import issue (#3)."""

from __future__ import annotations

from typing import Any


class ImportResult:
    pass


def import_tree(store: Any, data: Any, *, path: str = "/", replace: bool = False) -> ImportResult:
    raise NotImplementedError


def load_source(path: Any, format: str | None = None, allow: Any = ()) -> Any:  # noqa: A002
    raise NotImplementedError
