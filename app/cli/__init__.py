"""The `dlr` command line. Errors are one clear line on stderr and a non-zero exit."""

from app.cli import commands, export, forwarding
from app.cli.common import cli

forwarding.register(cli)
__all__ = ["cli", "commands", "export", "main"]


def main() -> None:
    cli(prog_name="dlr")
