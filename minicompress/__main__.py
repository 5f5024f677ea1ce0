"""``python -m minicompress`` (and ``torchrun -m minicompress``) runs the CLI."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
