"""privifs' one-line summary and version, from the package if it can be read.

``python -m privifs`` run in a directory that holds a ``privifs`` directory of its own imports
that as an empty namespace package (no docstring, no ``__version__``), while the commands'
modules still come from the installed package: ``privifs status`` failed there with an
AttributeError, and every command using the client with an ImportError.
"""

from __future__ import annotations

SUMMARY = "privifs: a FUSE filesystem that mounts a Privicore data-token vault as an ordinary drive."


def summary() -> str:
    import privifs

    doc = (getattr(privifs, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else SUMMARY


def version() -> str:
    import privifs

    found = getattr(privifs, "__version__", None)
    if found is None:
        from importlib import metadata

        try:
            found = metadata.version("privifs")
        except metadata.PackageNotFoundError:
            found = "unknown"
    return found
