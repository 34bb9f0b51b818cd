"""Placeholder, replaced by the export issue (#4)."""

from __future__ import annotations

from typing import Any


class ExportInfo:
    pass


def export(store: Any, path: Any, **options: Any) -> ExportInfo:
    raise NotImplementedError


def verify(path: Any) -> ExportInfo:
    raise NotImplementedError
