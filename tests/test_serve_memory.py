"""Which of a request's messages a user's memory reads (the contract of serve on a memory run)."""

from __future__ import annotations

from dialogtune.memory.conversation import MemoryConversation
from dialogtune.serve_memory import digest_of, unread

FIRST = [("user", "Hi, I keep bees.")]
SECOND = [*FIRST, ("assistant", "Lovely!"), ("user", "They made honey.")]


def served(messages) -> MemoryConversation:
    """A conversation that has read `messages` and replied (no model needed: unread reads notes only)."""
    conversation = MemoryConversation(run=None, turns_read=len(messages) + 1)
    conversation.notes = {"messages": len(messages), "digest": digest_of(messages)}
    return conversation


def test_a_request_that_continues_brings_only_what_follows_the_reply():
    conversation = served(FIRST)
    assert unread(conversation, SECOND) == [("user", "They made honey.")]  # "Lovely!" was the server's reply
    assert conversation.session == 1
    # a client that sent another message before the reply's place: read too
    assert unread(served(FIRST), [*FIRST, ("user", "Hello?"), ("user", "Anyone?")]) == [
        ("user", "Hello?"), ("user", "Anyone?")]


def test_any_other_request_is_a_new_session_read_whole():
    cases = {"shorter": [("user", "Hi")], "the same again (a retry)": SECOND,
             "a different start": [("user", "Hi, I keep wasps."), *SECOND[1:]]}
    for why, messages in cases.items():
        conversation = served(SECOND)
        assert unread(conversation, messages) == messages, why
        assert conversation.session == 2, why


def test_a_users_first_request_is_read_whole_in_session_one():
    conversation = MemoryConversation(run=None)
    assert unread(conversation, SECOND) == SECOND and conversation.session == 1
