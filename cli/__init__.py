"""The ``fastdense`` command line (Typer), one module per command group."""
