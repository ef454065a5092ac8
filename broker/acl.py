"""Reads a mosquitto ACL file and answers "may this user do this to this topic?".

Used by the embedded broker so that both broker modes enforce the same file `provision` writes.
Supported, as in mosquitto: `user NAME` sections, `topic [read|write|readwrite|deny] FILTER`
(lines before any `user` apply to anonymous clients), and `pattern [...] FILTER` lines that apply
to every user with `%u` (username) and `%c` (client id) substituted. Anything not granted is
denied; `deny` wins over a grant.

Publish checks a concrete topic against the grants. Subscribe checks the requested *filter*:
wildcards in it must be covered by the same wildcard (or `#`) in a grant, so `fl/F/r/+/inbox/+`
is refused to a device whose grant is `fl/F/r/+/inbox/dev-1`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from fleetlearn.shared.errors import FleetlearnError


class AclError(FleetlearnError):
    """The ACL file has a line this reader does not understand."""


class Access(enum.Flag):
    READ = enum.auto()
    WRITE = enum.auto()
    DENY = enum.auto()


_ACCESS_WORDS = {
    "read": Access.READ,
    "write": Access.WRITE,
    "readwrite": Access.READ | Access.WRITE,
    "deny": Access.DENY,
}


@dataclass(frozen=True, slots=True)
class _Rule:
    access: Access
    pattern: str


@dataclass(slots=True)
class Acl:
    anonymous: list[_Rule] = field(default_factory=list)
    users: dict[str, list[_Rule]] = field(default_factory=dict)
    patterns: list[_Rule] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, *, source: str = "acl") -> Acl:
        acl = cls()
        current: list[_Rule] = acl.anonymous
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            rest = rest.strip()
            if word == "user":
                if not rest:
                    raise AclError(f"{source}:{lineno}: 'user' needs a name")
                current = acl.users.setdefault(rest, [])
            elif word in ("topic", "pattern"):
                access_word, _, pattern = rest.partition(" ")
                if access_word in _ACCESS_WORDS and pattern.strip():
                    rule = _Rule(_ACCESS_WORDS[access_word], pattern.strip())
                else:  # mosquitto: a bare filter means readwrite
                    rule = _Rule(Access.READ | Access.WRITE, rest)
                (current if word == "topic" else acl.patterns).append(rule)
            else:
                raise AclError(f"{source}:{lineno}: unknown directive {word!r}")
        return acl

    @classmethod
    def load(cls, path: Path | str) -> Acl:
        return cls.parse(Path(path).read_text(encoding="utf-8"), source=str(path))

    def _rules(self, username: str | None, client_id: str | None) -> list[_Rule]:
        if username is None:
            return list(self.anonymous)
        rules = list(self.users.get(username, []))
        for rule in self.patterns:
            # mosquitto refuses to substitute ids that could widen the pattern.
            if any(ch in (username or "") for ch in "+#/") or any(
                ch in (client_id or "") for ch in "+#/"
            ):
                continue
            pattern = rule.pattern.replace("%u", username).replace("%c", client_id or "")
            rules.append(_Rule(rule.access, pattern))
        return rules

    def allowed(
        self, username: str | None, client_id: str | None, topic: str, want: Access
    ) -> bool:
        """May `username` publish (WRITE) to topic, or subscribe (READ) to filter `topic`?"""
        granted = False
        for rule in self._rules(username, client_id):
            if not _covers(rule.pattern, topic):
                continue
            if rule.access & Access.DENY:
                return False
            if rule.access & want:
                granted = True
        return granted


def _covers(grant: str, requested: str) -> bool:
    """True when every topic matched by `requested` is matched by the `grant` filter."""
    g_parts, r_parts = grant.split("/"), requested.split("/")
    for i, g in enumerate(g_parts):
        if g == "#":
            return True
        if i >= len(r_parts):
            return False
        r = r_parts[i]
        if g == "+":
            if r == "#":
                return False
            continue
        if g != r:
            return False
    return len(g_parts) == len(r_parts)
