"""The TLS context every HTTP client of this process shares.

httpx builds a new verifying context for each client it makes, loading the CA bundle into it:
about 40 ms of CPU each time. A process that makes several clients (the mount's transport and its
URL check, a test run's hundreds) pays for it once. Same verification as httpx's own default:
the certifi bundle, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def shared_tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()
