"""The per-user memory store: files named by a digest, one user's turns at a time."""

from __future__ import annotations

import threading
import time

from dialogtune.memory.users import UserMemories


def test_files_are_named_by_a_digest_of_the_user_id(tmp_path):
    store = UserMemories(run=None, directory=tmp_path)
    path = store.path_for("../alice@example.com")
    assert path.parent == tmp_path and path.suffix == ".safetensors" and len(path.stem) == 32
    assert "alice" not in path.name and path == store.path_for("../alice@example.com")
    assert path != store.path_for("bob")


def test_one_users_requests_wait_for_each_other_and_other_users_do_not(tmp_path):
    store = UserMemories(run=None, directory=tmp_path)
    events = []

    def turn(user: str, name: str, hold: float) -> None:
        with store.conversation_for(user) as conversation:
            assert conversation.turns_read == 0 and conversation.run is None  # never seen: a new conversation
            events.append(f"{name} in")
            time.sleep(hold)
            events.append(f"{name} out")

    first = threading.Thread(target=turn, args=("alice", "alice 1", 0.3))
    first.start()
    time.sleep(0.1)
    second = threading.Thread(target=turn, args=("alice", "alice 2", 0.0))
    other = threading.Thread(target=turn, args=("bob", "bob", 0.0))
    second.start()
    other.start()
    for thread in (first, second, other):
        thread.join()
    assert events.index("alice 2 in") > events.index("alice 1 out")  # serialized
    assert events.index("bob out") < events.index("alice 1 out")  # not held up by alice
    assert not list(tmp_path.iterdir())  # nothing written without save
