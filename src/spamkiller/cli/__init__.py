"""The `spam-killer` command (contract.md): run, check-config, config dump.

User errors are `click.ClickException`s with exit codes, never tracebacks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from spamkiller import __version__

if TYPE_CHECKING:
    from spamkiller.config import Config


def _config_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _load_or_exit(path: Path | None) -> Config:
    """The validated config, or its problems on stderr (one `key.path: reason` each) and exit 1."""
    from spamkiller.config import load
    from spamkiller.errors import ConfigError

    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spam-killer")
def cli() -> None:
    """Spam Killer: an inbound mail filter that relays accepted mail before-queue over TLS."""


@cli.command()
@click.option(
    "-c", "--config", "config_file", metavar="FILE", help="YAML config (default: built-in)."
)
def run(config_file: str | None) -> None:
    """Run the MX in the foreground; logs go to stdout."""
    from spamkiller.server.app import run as run_app

    sys.exit(run_app(_config_path(config_file)))


@cli.command("check-config")
@click.option("-c", "--config", "config_file", metavar="FILE", required=True, help="YAML config.")
def check_config(config_file: str) -> None:
    """Validate config, certificates and keys without starting (exit 1 on problems)."""
    from spamkiller.config import check_files

    config = _load_or_exit(Path(config_file))
    problems = check_files(config)
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        sys.exit(1)
    click.echo(f"{config_file}: ok")


@cli.group("config")
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command("dump")
@click.option(
    "-c", "--config", "config_file", metavar="FILE", help="YAML config (default: built-in)."
)
def config_dump(config_file: str | None) -> None:
    """Print the effective configuration, defaults included."""
    from spamkiller.config import dump_effective

    click.echo(dump_effective(_load_or_exit(_config_path(config_file))), nl=False)


def main() -> None:
    cli(prog_name="spam-killer")
