"""Cryptography: the vault's AES-256-GCM wire format, the local at-rest format, key files."""
