"""The mount helpers the tests import by this name; they live in :mod:`privifs.devkit.mount`
(shared with the scripts)."""

from privifs.devkit.mount import CMD_TIMEOUT, Mount, is_mounted, isolated_env, privifs

__all__ = ["CMD_TIMEOUT", "Mount", "is_mounted", "isolated_env", "privifs"]
