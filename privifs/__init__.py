"""privifs: a FUSE filesystem that mounts a Privicore data-token vault as an ordinary drive.

Layers, top to bottom (see docs/architecture.md):

* ``privifs.cli``     command line (mount, umount, status, init, token, engine)
* ``privifs.fs``      FUSE operations, namespace, staging, cache, write-back, refresh
* ``privifs.client``  the async Privicore client (session, events, data tokens)
* ``privifs.crypto``  AES-256-GCM wire format, local at-rest format, key files
* ``privifs.engine``  the local Privicore-compatible engine (a separate process)
"""

__version__ = "0.1.0"
