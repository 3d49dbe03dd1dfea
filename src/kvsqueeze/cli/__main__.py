"""`python -m kvsqueeze.cli ...`: the `kvsqueeze` CLI."""

from .main import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="kvsqueeze")
