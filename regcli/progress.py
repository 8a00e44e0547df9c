"""Progress reporting protocol used by the library; the CLI renders it with rich on stderr."""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger("regcli")


class Progress(Protocol):
    def start(self, stage: str, total: int) -> None: ...

    def update(self, stage: str, completed: int, info: str = "") -> None: ...

    def finish(self, stage: str) -> None: ...


class NullProgress:
    """Reports nothing (library default)."""

    def start(self, stage: str, total: int) -> None:
        pass

    def update(self, stage: str, completed: int, info: str = "") -> None:
        pass

    def finish(self, stage: str) -> None:
        pass


