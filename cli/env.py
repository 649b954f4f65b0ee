"""``fastdense env``: what a bug report needs (versions, device, kernel dispatch), from fastdense.env."""

from __future__ import annotations

from typing import Annotated

from fastdense.cli._options import json_option


def env(
    as_json: Annotated[bool, json_option("Print JSON instead of a table.")] = False,
) -> None:
    """Print versions of python/torch/triton/diffusers/peft/deepspeed, the device and the kernel dispatch."""
    from fastdense.env import collect_env

    info = collect_env()
    if as_json:
        import json

        print(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fastdense env", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in info.items():
        table.add_row(key, value)
    Console().print(table)
