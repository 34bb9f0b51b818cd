"""The demo and the design comparison: programs written against snaptree's public API only.

:mod:`snaptree.demo.transfers` is ``snaptree demo`` (import a model, transfer
money from threads while an Exporter dumps); :mod:`snaptree.demo.compare` runs
the original design, its workarounds and snaptree (:mod:`snaptree.demo.designs`)
side by side and measures them.
"""

from .transfers import DemoResult, run_demo, summary

__all__ = ["DemoResult", "run_demo", "summary"]
