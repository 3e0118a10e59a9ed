"""The async Privicore client (trio, httpx, trio-websocket).

* :mod:`~privifs.client.shapes`     normalises every wire shape the reference records
* :mod:`~privifs.client.transport`  HTTP with retries and the error mapping
* :mod:`~privifs.client.session`    authorization: login, renewal ahead of expiry, 401 replay, revoke
* :mod:`~privifs.client.events`     the one WebSocket: join, waiters, early events, reconnect, polling
* :mod:`~privifs.client.datatokens` the data-token operations on ciphertext
* :mod:`~privifs.client.vault`      AES-256-GCM streaming encryption wrapped around data tokens
* :mod:`~privifs.client.provision`  registering profiles and keys; :mod:`~privifs.client.oauth` OAuth
* :mod:`~privifs.client.connect`    :func:`connect`, the one entry point that wires them together
"""
