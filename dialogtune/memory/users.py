"""One memory per user, on disk: what `serve` keeps for a memory run.

A user's memory is one state file (`MemoryConversation.save`) in the store's directory, named by
a digest of the user id, never the id itself: ids can hold anything a client sends, paths cannot.
Requests of one user are serialized by that user's lock (a turn reads, replies and saves as one);
different users never wait for each other here. A server restarted over the same directory finds
every user's memory where it left it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dialogtune.memory.conversation import MemoryConversation, MemoryRun


class UserStates:
    """Per-user state files in `directory` (`suffix`), each loaded with `load(path)` or made with
    `create()`, saved with the state's own `save(path)` (atomic), under a lock per user."""

    def __init__(self, directory: Path, suffix: str, load: Callable[[Path], Any], create: Callable[[], Any]):
        self.directory = Path(directory)
        self.suffix, self._load, self._create = suffix, load, create
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def path_for(self, user: str) -> Path:
        return self.directory / (hashlib.sha256(user.encode("utf-8")).hexdigest()[:32] + self.suffix)

    def _lock_for(self, path: Path) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(path.name, threading.Lock())

    @contextmanager
    def state_for(self, user: str) -> Iterator[Any]:
        """The user's state (a new one for a user never seen), theirs alone until the block ends.
        Nothing is written unless the block calls `save`."""
        path = self.path_for(user)
        with self._lock_for(path):
            yield self._load(path) if path.exists() else self._create()

    def save(self, user: str, state) -> None:
        """Written whole or not at all (a kill mid-write leaves the previous state)."""
        state.save(self.path_for(user))


class UserMemories(UserStates):
    """A memory run's users: one MemoryConversation each (a safetensors state file)."""

    def __init__(self, run: MemoryRun, directory: Path):
        super().__init__(directory, ".safetensors", lambda path: MemoryConversation.load(run, path),
                         lambda: MemoryConversation(run))
        self.run = run

    conversation_for = UserStates.state_for
