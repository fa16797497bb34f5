"""The command runners, one module per command, above everything else in the house.

Each ``run_*`` function takes paths, a config or recipe, and returns its summary; each runs inside
a :class:`reliableswap.jobs.Job` (settings pin, per-unit records, atomic writes, progress, one
summary schema). :mod:`reliableswap.cli` only parses flags and calls these.
"""
