"""The filesystem: a Privicore vault as a directory tree (``privifs mount``).

Layers, top to bottom (see docs/architecture.md):

* :mod:`~privifs.fs.operations`  thin pyfuse3 handlers: arguments in, errno out
* :mod:`~privifs.fs.errnos`      the one table: error type → errno
* :mod:`~privifs.fs.filesystem`  the filesystem logic behind each handler
* :mod:`~privifs.fs.namespace`   the inode tree, paths, the local index (state DB); the only
                                  writer of a node's fields
* :mod:`~privifs.fs.staging`     unuploaded content, sealed on local disk
* :mod:`~privifs.fs.cache`       verified downloaded content, sealed, in diskcache
* :mod:`~privifs.fs.sync`        write-back: uploads, meta updates, deletes; recovery
* :mod:`~privifs.fs.refresh`     merging the vault's listing; kernel cache invalidation
* :mod:`~privifs.fs.tokenmeta`   how a node is written into token file meta and risk meta
* :mod:`~privifs.fs.names`       the name rules: token fileName/extension ↔ entry name, conflicts
* :mod:`~privifs.fs.daemon`      mount lifecycle, control socket, status
* :mod:`~privifs.fs.registry`    the mounts' registry and one control request (clients' side)
"""
