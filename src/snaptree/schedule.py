"""Placeholder, replaced by the export issue (#4)."""


class Exporter:
    pass
