"""The ``dcnbench`` command line: a thin Click layer over the library."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dcnbench")
def main() -> None:
    """Deformable ConvNets (Dai et al., 2017): fast deformable ops and the paper's ablations."""


@main.command()
def backends() -> None:
    """Show which operator backends are available here (reference, native CPU, CUDA)."""
    from rich.console import Console
    from rich.table import Table

    from dcnbench.ops import available_backends

    table = Table(title="dcnbench operator backends")
    table.add_column("backend")
    table.add_column("status")
    for name, status in available_backends().items():
        table.add_row(name, status)
    Console().print(table)


if __name__ == "__main__":
    main()
