"""``python -m ebooklet``: the command line (see :mod:`ebooklet.cli`)."""

from ebooklet.cli import run

if __name__ == "__main__":
    run()
