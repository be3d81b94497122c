"""Semantic versions and the version requirements that messages may carry.

Precedence follows semver 2.0.0: pre-release versions sort before the release
they precede, numeric identifiers compare numerically, and build metadata is
ignored for ordering.
"""

from __future__ import annotations

import re
from functools import total_ordering

from .actions import shown

# ASCII digits only, and the whole string (fullmatch: no trailing newline).
# 64 characters per number is far beyond any real version and keeps int() cheap.
_SEMVER = re.compile(
    r"(0|[1-9][0-9]{0,63})\.(0|[1-9][0-9]{0,63})\.(0|[1-9][0-9]{0,63})"
    r"(?:-((?:0|[1-9][0-9]{0,63}|[0-9]*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9][0-9]{0,63}|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)
_REQUIREMENT = re.compile(r"(0|[1-9][0-9]{0,63})(?:\.(0|[1-9][0-9]{0,63}))?(?:\.(0|[1-9][0-9]{0,63}))?")


class InvalidVersion(ValueError):
    pass


@total_ordering
class Version:
    """A parsed semantic version; hashable and ordered by semver precedence."""

    __slots__ = ("major", "minor", "patch", "prerelease", "text", "_key")

    def __init__(self, text: str):
        match = _SEMVER.fullmatch(text) if isinstance(text, str) and len(text) <= 256 else None
        if match is None:
            raise InvalidVersion(f"{shown(text)} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.4.0)")
        self.text = text
        self.major, self.minor, self.patch = (int(match.group(i)) for i in (1, 2, 3))
        self.prerelease = tuple(match.group(4).split(".")) if match.group(4) else ()
        # A release sorts after all of its pre-releases: (1,) > (0, ...).
        pre_key = (
            (0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease))
            if self.prerelease
            else (1, ())
        )
        self._key = (self.major, self.minor, self.patch, pre_key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key == other._key

    def __lt__(self, other: Version) -> bool:
        return self._key < other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Version({self.text!r})"


UNVERSIONED = Version("0.0.0")


class InvalidRequirement(ValueError):
    pass


class Requirement:
    """A message's `version` field: "2" (any 2.x.y), "2.1" (any 2.1.x) or "2.1.3"."""

    __slots__ = ("parts", "text")

    def __init__(self, text: str):
        match = _REQUIREMENT.fullmatch(text) if isinstance(text, str) and len(text) <= 256 else None
        if match is None:
            raise InvalidRequirement(
                f"version requirement {shown(text)} must look like \"2\", \"2.1\" or \"2.1.3\""
            )
        self.text = text
        self.parts = tuple(int(g) for g in match.groups() if g is not None)

    def matches(self, version: Version) -> bool:
        # "2.1.3" means exactly that release, not one of its pre-releases.
        if len(self.parts) == 3 and version.prerelease:
            return False
        return (version.major, version.minor, version.patch)[: len(self.parts)] == self.parts

    def __repr__(self) -> str:
        return f"Requirement({self.text!r})"
