"""The measuring helpers the tests import by this name; they live in :mod:`privifs.devkit.measure`
(shared with the scripts)."""

from privifs.devkit.measure import PeakRss

__all__ = ["PeakRss"]
