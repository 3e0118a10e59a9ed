"""``python -m privifs`` runs the command line."""

from privifs.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
