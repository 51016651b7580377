"""The ``moerge`` command line: parsing, progress and error display only; the work is in moerge.api
and the packages below it. Nothing in moerge imports this package."""

from moerge.cli import evaluation, merge, moe, route, stats
from moerge.cli._common import main

for _module in (merge, stats, evaluation, route, moe):
    for _command in _module.COMMANDS:
        main.add_command(_command)

__all__ = ["main"]
