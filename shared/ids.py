"""What a fleet id or device id may look like.

Ids become MQTT topic levels, broker usernames, ACL patterns and file names, so they must be
inert in all four places: no topic separators or wildcards (`/ + #`), no `$` (reserved topic
prefix and shell metacharacter), no whitespace or control characters, no leading dot, bounded
length. The rule lives here once; `topics`, `wire` and `broker.provision` raise their own error
types with the problem this module names.
"""

from __future__ import annotations

import re

MAX_ID_LENGTH = 64

# Letters, digits and a few separators. Deliberately narrower than MQTT allows: an id also names
# files and appears in mosquitto's ACL file, where spaces and '%' have meaning.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


# Ids already found valid. A round of 1000 devices validates the same ids ~150,000 times
# (every nested share, roster entry and announcement names devices); a set lookup is a tenth
# of a regex match. Bounded: cleared when full, so hostile ids cannot grow it without limit.
_VALID: set[str] = set()
_VALID_MAX = 65_536


def id_problem(value: object) -> str | None:
    """Return why `value` is not a usable id, or None when it is."""
    if type(value) is str:
        if value in _VALID:
            return None
        # The pattern alone excludes separators, wildcards, '$', whitespace and control chars.
        if len(value) <= MAX_ID_LENGTH and _ID_PATTERN.fullmatch(value):
            if len(_VALID) >= _VALID_MAX:
                _VALID.clear()
            _VALID.add(value)
            return None
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_LENGTH:
        return f"is {len(value)} characters long; the limit is {MAX_ID_LENGTH}"
    for ch in "/+#$":
        if ch in value:
            return f"must not contain {ch!r} (MQTT separator, wildcard or reserved prefix)"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return "must not contain control characters"
    if not _ID_PATTERN.fullmatch(value):
        return (
            f"{value!r} may hold only letters, digits and '_', '.', ':', '-', "
            "and must start with a letter or digit"
        )
    return None
