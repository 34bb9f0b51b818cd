#!/usr/bin/env python3
"""Scheduled export of a snaptree store, for cron or a systemd timer.

The same as ``snaptree export``; see ``--help`` and docs/export.md. Examples:

    # cron: every 15 minutes, keep a day's worth
    */15 * * * *  /srv/app/.venv/bin/python /srv/app/scripts/export.py --db /srv/app/data/app.fs --dir /srv/app/dumps --keep 96

    # or one long-running process
    scripts/export.py --db data/app.fs --dir dumps --every 300 --keep 24
"""  # noqa: E501

from snaptree.cli import main

if __name__ == "__main__":
    main(args=["export", *__import__("sys").argv[1:]], prog_name="export.py")
