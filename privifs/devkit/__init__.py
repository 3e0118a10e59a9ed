"""Helpers for the tests and the scripts under ``scripts/`` (measurements, benchmarks), not for
users: a real engine as a subprocess and raw wire access to it (:mod:`privifs.devkit.engine`),
real mounts as isolated users (:mod:`privifs.devkit.mount`), and resource measurement
(:mod:`privifs.devkit.measure`, which needs psutil from the ``test`` or ``bench`` extra).

Nothing in ``privifs`` outside this package imports it.
"""
