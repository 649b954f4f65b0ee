"""The ``fastdense`` command line (Typer), one module per command group."""

if __name__ == "cli":  # the checkout root is on sys.path: see fastdense/_shadow_guard.py
    from fastdense._shadow_guard import reroute

    reroute(__name__, __file__)
