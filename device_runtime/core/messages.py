"""Chat messages as plain dicts: the one check shared by the router and the SLM."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

#: Roles a chat message may have.  The router's history takes only the dialogue
#: roles; a system message is not part of what it scores.
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
DIALOGUE_ROLES: tuple[str, ...] = ("user", "assistant")


def is_text(value: Any) -> bool:
    """A ``str`` that UTF-8 can encode (no lone surrogates, which JSON escapes
    and undecodable input bytes can produce and tokenizers reject)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_message(
    message: Any,
    where: str,
    *,
    roles: tuple[str, ...] = CHAT_ROLES,
    error: type[ValueError] = ValueError,
) -> dict[str, str]:
    """``{"role", "content"}`` of ``message``, or ``error`` naming ``where`` and the fault."""
    if not isinstance(message, Mapping):
        raise error(f"{where} is not an object with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role not in roles:
        raise error(f"{where}: unknown role {role!r}; expected one of {roles}")
    if not isinstance(content, str):
        raise error(f"{where}: content must be a string")
    if not is_text(content):
        raise error(f"{where}: content is not valid Unicode text (it holds a lone surrogate)")
    return {"role": role, "content": content}


def transcript_digest(messages: Sequence[Mapping[str, str]]) -> bytes:
    """A SHA-256 chain over the role and content of each message, in order.

    The device sends it with the number of messages it holds, and the edge
    cuts its own transcript back to that length only if its prefix has the
    same digest: a count alone says nothing about content.  Each link hashes
    the previous digest, the role, and the length-prefixed UTF-8 content, so
    no two different transcripts share a digest by splitting text differently.
    """
    digest = bytes(32)
    for message in messages:
        role = str(message["role"]).encode("utf-8")
        content = str(message["content"]).encode("utf-8", "surrogatepass")
        h = hashlib.sha256(digest)
        h.update(len(role).to_bytes(4, "big") + role)
        h.update(len(content).to_bytes(8, "big") + content)
        digest = h.digest()
    return digest
