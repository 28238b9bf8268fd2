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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dialogtune.memory.conversation import MemoryConversation, MemoryRun

SUFFIX = ".safetensors"


class UserMemories:
    def __init__(self, run: MemoryRun, directory: Path):
        self.run = run
        self.directory = Path(directory)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def path_for(self, user: str) -> Path:
        return self.directory / (hashlib.sha256(user.encode("utf-8")).hexdigest()[:32] + SUFFIX)

    def _lock_for(self, path: Path) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(path.name, threading.Lock())

    @contextmanager
    def conversation_for(self, user: str) -> Iterator[MemoryConversation]:
        """The user's conversation (a new one for a user never seen), theirs alone until the block
        ends. Nothing is written unless the block calls `save`."""
        path = self.path_for(user)
        with self._lock_for(path):
            yield MemoryConversation.load(self.run, path) if path.exists() else MemoryConversation(self.run)

    def save(self, user: str, conversation: MemoryConversation) -> None:
        """Written whole or not at all (a kill mid-write leaves the previous state)."""
        conversation.save(self.path_for(user))
