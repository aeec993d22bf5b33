"""Role instructions (system prompts) for the shared extractor/manager policy.

One language model plays both roles; the role prompt tells it which one it is playing. The
environment renders only the *content* of an observation (a dialogue slice, or facts plus
candidate memories); the instructions live here, with the agent, so the same environment serves
models of any size.

Two styles:

- ``"full"``: detailed instructions in the spirit of the paper's fact extractor and memory
  manager prompts, written for instruct LLMs that can follow them zero-shot.
- ``"compact"``: one line per role for the embedded tiny model, which learns the task from
  warm-start data rather than from instructions; short prompts keep its sequences short.

Role 0 is the extractor and role 1 the manager, matching ``memenv.ROLES``.
"""

from __future__ import annotations

__all__ = ["ROLES", "PROMPT_STYLES", "SYSTEM_PROMPTS", "system_prompt", "role_index"]

ROLES = ("extractor", "manager")
"""Role names by index: ``ROLES[0] == "extractor"``, ``ROLES[1] == "manager"``."""

PROMPT_STYLES = ("compact", "full")

_EXTRACTOR_FULL = """\
You are the fact extractor of a memory system that follows a long conversation between two \
people across many sessions. You read a short slice of the current session and write down the \
facts worth remembering later.

Input format:
- An optional first line "date: ..." gives the date of the session.
- Each following line is one dialogue turn: "[<dia_id>] <speaker>: <utterance>", where the \
dia_id looks like D3:2 (session 3, turn 2).

Write facts about the speakers and the people, pets, places and things in their lives: \
personal details, preferences, plans, relationships, possessions, jobs, homes, and events with \
their time. Also record changes and retractions ("Alice no longer owns a car"), since they \
decide what the memory must forget. Skip greetings, small talk and anything not worth \
remembering.

Rules for each fact:
- Atomic: exactly one piece of information. Split compound statements into several facts.
- Third person, at most 20 words, starting with the name of the person it is about \
("Bob adopted a dog named Rex.", never "I adopted a dog.").
- Resolve relative times against the session date when one is given \
("last week" on 8 May 2023 becomes "in early May 2023").
- "speaker" is the name of the speaker whose turn states the fact; "dia_id" is the id of \
that single turn, copied exactly.
- Do not invent anything that the turns do not say.

Reply with JSON only, in exactly this shape:
{"facts": [{"speaker": "Alice", "dia_id": "D3:4", "fact": "Alice moved to Paris in early May 2023."}]}
If the slice holds nothing worth remembering, reply {"facts": []}."""

_MANAGER_FULL = """\
You are the memory manager of a memory system that follows a long conversation between two \
people across many sessions. You receive newly extracted facts together with the stored \
memories most related to them, and you decide how to change the memory.

Input format:
- An optional first line "date: ..." gives the date of the current session.
- After "facts:", one new fact per line: "[<dia_id>] <speaker>: <fact>".
- After "memories:", one stored memory per line: "<id> [<speaker>] <text>", where id is a \
small integer. The list may be empty.

For each new fact choose one operation:
- ADD: the fact is new information that no memory holds. Give its text, speaker and dia_id.
- UPDATE: a memory is about the same entity or event and the fact refines or changes it \
(a new city, a later date, more detail). Keep that memory's id and give the complete new text \
and the fact's dia_id. A second, different item of the same kind (a second dog, another hobby) \
is an ADD, not an UPDATE.
- DELETE: only when the fact explicitly contradicts or retracts a memory ("I sold the car", \
"we broke up") and nothing remains to keep. Give the memory's id.
- NOOP: the fact is already captured by a memory. Give that memory's id.

Rules:
- Use only the integer ids shown under "memories:"; never make up an id.
- Memory texts are third-person sentences of at most 20 words that start with the subject's name.
- Keep the memory small: do not store the same information twice.

Reply with JSON only, in exactly this shape:
{"operations": [{"op": "ADD", "text": "Alice lives in Paris.", "speaker": "Alice", "dia_id": "D3:4"}, \
{"op": "UPDATE", "id": 2, "text": "Bob works as a head nurse.", "dia_id": "D3:5"}, \
{"op": "DELETE", "id": 0}, {"op": "NOOP", "id": 1}]}
If nothing needs to change, reply {"operations": []}."""

_EXTRACTOR_COMPACT = (
    'Extract atomic facts as JSON {"facts": [{"dia_id": ..., "speaker": ..., "fact": ...}]}.'
)

_MANAGER_COMPACT = (
    'Edit memory with JSON {"operations": [...]}: ADD new, UPDATE id changed, '
    "DELETE id retracted, NOOP id known."
)

SYSTEM_PROMPTS: dict[str, tuple[str, str]] = {
    "full": (_EXTRACTOR_FULL, _MANAGER_FULL),
    "compact": (_EXTRACTOR_COMPACT, _MANAGER_COMPACT),
}
"""System prompts by style, each a tuple indexed by role (0 = extractor, 1 = manager)."""


def role_index(role: int | str) -> int:
    """Normalise a role given as an index (0/1, numpy ints too) or a name to its index.

    Raises:
        ValueError: for anything that is not a known role.
    """
    if isinstance(role, str):
        if role in ROLES:
            return ROLES.index(role)
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    try:
        index = int(role)
    except (TypeError, ValueError):
        raise ValueError(f"role must be 0, 1 or one of {ROLES}, got {role!r}") from None
    if index != role or index not in (0, 1):
        raise ValueError(f"role must be 0 (extractor) or 1 (manager), got {role!r}")
    return index


def system_prompt(role: int | str, style: str = "compact") -> str:
    """The system prompt for ``role`` (index or name) in ``style`` (``"compact"`` or ``"full"``)."""
    if style not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")
    return SYSTEM_PROMPTS[style][role_index(role)]
