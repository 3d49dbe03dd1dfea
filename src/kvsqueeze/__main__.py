"""`python -m kvsqueeze ...` (and so `torchrun --nproc-per-node N -m kvsqueeze sweep ...`): the `kvsqueeze` CLI."""

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="kvsqueeze")
