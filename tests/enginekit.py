"""The engine helpers the tests import by this name; they live in :mod:`privifs.devkit.engine`
(shared with the scripts)."""

from privifs.devkit.engine import Channel, EngineProcess, Wire, command_id

__all__ = ["Channel", "EngineProcess", "Wire", "command_id"]
