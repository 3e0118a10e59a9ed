"""Names: how a token's ``fileName`` and ``extension`` become a directory entry's name, and how an
entry's name becomes the ``fileName`` and ``extension`` its token carries. Every name rule of the
mount lives here (:mod:`privifs.fs.tokenmeta` re-exports them for older imports).

* :func:`joined_name` — the raw name a token claims: fileName, plus ``.extension`` when the
  fileName lacks it (``README`` + ``md`` → ``README.md``); :func:`entry_name` the same for a
  listed token.
* :func:`display_name` — a raw name made fit for a directory (no ``/`` or NUL, not ``.``/``..``,
  at most :data:`NAME_MAX` bytes).
* :func:`shown_name` / :func:`listed_name` — both: the entry a token shows as.
* :func:`conflict_name` — the name of a token whose path another token already holds.
* :func:`token_naming` — the other way: the fileName and extension a node's token should carry.
  While the entry still shows under the name its token gave it (the node's ``shown_as``, set
  through :meth:`Namespace.set_remote_name <privifs.fs.namespace.Namespace.set_remote_name>`
  or :meth:`~privifs.fs.namespace.Namespace.show_as`), the token's own fields are kept as they
  are; after a rename here, the new name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from privifs.client.shapes import TokenInfo

NAME_MAX = 255
# The longest path the vault records for an entry ("/" + names joined by "/", in characters):
# the engine refuses a longer ``context`` or ``path`` (HTTP 422, routes_datatoken.CONTEXT_MAX),
# so an entry below it could never be uploaded; such entries are refused at once with
# ENAMETOOLONG instead. Well above PATH_MAX (4096 bytes): a program may name a path of PATH_MAX
# relative to a working directory deep in the drive (pjdfstest's */03.t do), and that must work.
VAULT_PATH_MAX = 16384


class NamedEntry(Protocol):
    """What :func:`token_naming` reads of a node."""

    name: str
    shown_as: str | None
    remote_name: str | None
    remote_extension: str | None


def extension_of(name: str) -> str:
    """The last suffix of ``name`` without the dot (``""`` for none, or for a dot file)."""
    stem, dot, ext = name.rpartition(".")
    return ext if dot and stem and "/" not in ext else ""


def blank(name: str) -> bool:
    """Whether ``name`` is empty or whitespace only (``" "``, ``"\\t"``, ``"\\n"``): the vault refuses
    such a ``fileName`` (HTTP 422, "must not be empty"), so an entry named so could never be
    uploaded; it is refused at once (EINVAL) instead of staying staged for good."""
    return not name.strip()


def entry_problem(name: str) -> str | None:
    """Why ``name`` cannot be one entry of a directory, or None if it can: blank (see
    :func:`blank`), ``.`` or ``..``, or holding a ``/`` or a NUL. (Its length, at most
    :data:`NAME_MAX` bytes, is the caller's to check: the mount answers ENAMETOOLONG for it.)"""
    if blank(name):
        return "a file name cannot be empty (or blanks only)"
    if "/" in name or "\0" in name:
        return (
            f"{name!r} is not one file name: it holds a {'/' if '/' in name else 'NUL'!r} "
            "(a name in a directory; the directory is given apart)"
        )
    if name in (".", ".."):
        return f"{name!r} cannot name a file"
    return None


def display_name(raw: str) -> str:
    """A name as it can appear in a directory: no slash or NUL, not ``.``/``..``/empty, ≤ 255 bytes."""
    name = raw.replace("/", "\u2215").replace("\0", "")
    if name in ("", ".", ".."):
        name = f"unnamed{name}"
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > NAME_MAX:
        name = encoded[: NAME_MAX - 12].decode("utf-8", "ignore") + "~truncated"
    return name


def joined_name(file_name: str, extension: str | None) -> str:
    """The raw name a fileName and extension claim: the extension is appended when missing. An
    extension written with its dot (``.md``, as some applications send it though the reference
    says "no dot") counts as the same extension: ``doc`` + ``.md`` is ``doc.md`` and
    ``report.pdf`` + ``.pdf`` stays ``report.pdf`` (they showed as ``doc..md`` and
    ``report.pdf..pdf``)."""
    extension = (extension or "").lstrip(".")
    if extension and not file_name.endswith("." + extension):
        return f"{file_name}.{extension}"
    return file_name


def entry_name(info: TokenInfo) -> str:
    """The raw name a listed token claims: fileName, plus its extension when fileName lacks it."""
    return joined_name(info.file_name, info.extension)


def shown_name(file_name: str, extension: str | None) -> str:
    """The directory entry a token with this fileName and extension shows as."""
    return display_name(joined_name(file_name, extension))


def listed_name(info: TokenInfo) -> str:
    """The directory entry a listed token shows as (its plain name, before any conflict)."""
    return shown_name(info.file_name, info.extension)


def conflict_name(name: str, token: str) -> str:
    """Deterministic name for a token whose path another token already holds. A name too long
    for the conflict mark loses the end of its stem, never the mark: cut to 255 bytes as a whole,
    the conflict name of a long name was the name itself, and the token holding it hid the other
    (another application's two long names that differ only past the cut: one never showed)."""
    short = "".join(c for c in token if c.isalnum())[-8:]
    stem, dot, ext = name.rpartition(".")
    suffix = f".conflict-{short}.{ext}" if dot and stem else f".conflict-{short}"
    if not (dot and stem) or len(suffix.encode("utf-8", "surrogatepass")) >= NAME_MAX:
        stem, suffix = name, f".conflict-{short}"  # no extension, or one too long to keep
    room = NAME_MAX - len(suffix.encode("utf-8", "surrogatepass"))
    encoded = stem.encode("utf-8", "surrogatepass")
    if len(encoded) > room:
        stem = encoded[:room].decode("utf-8", "ignore")
    return display_name(stem + suffix)


def token_naming(node: NamedEntry) -> tuple[str, str]:
    """The fileName and extension the node's token should carry. While the entry still shows under
    the name derived from the token (``shown_as``), the token's own fields are kept as they are
    (another application's ``README`` + ``md`` stays so); after a rename, the new name."""
    if node.shown_as is not None and node.name == node.shown_as and node.remote_name is not None:
        return node.remote_name, node.remote_extension or ""
    return node.name, extension_of(node.name)


def token_name(node: NamedEntry) -> str:
    """The fileName the node's token should carry (see :func:`token_naming`)."""
    return token_naming(node)[0]
