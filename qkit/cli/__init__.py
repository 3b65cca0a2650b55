"""The `qkit` command."""
from qkit.cli.main import main  # noqa: F401
