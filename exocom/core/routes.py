"""The routing table: who may send a name, and which roles receive it under
which internal name. Compiled once from the configuration so that the
per-message path is a few dictionary lookups.
"""

from __future__ import annotations

from .config import Config, Profile, RoleConfig
from .versions import Version


class CompiledProfile:
    """A profile turned into lookups: internal<->public names, sends, receives."""

    __slots__ = ("sends", "to_public", "to_internal", "receives")

    def __init__(self, profile: Profile):
        self.to_public = {t.internal: t.public for t in profile.translations}
        self.to_internal = {t.public: t.internal for t in profile.translations}
        self.sends = frozenset(profile.sends)
        # Receives lists internal names; match on the public name.
        self.receives = frozenset(self.to_public.get(n, n) for n in profile.receives)

    def public_name(self, internal: str) -> str:
        return self.to_public.get(internal, internal)

    def internal_name(self, public: str) -> str:
        return self.to_internal.get(public, public)


class RoleRoutes:
    __slots__ = ("config", "base", "overrides", "_by_version")

    def __init__(self, config: RoleConfig):
        self.config = config
        self.base = CompiledProfile(config.profile)
        self.overrides = [(req, CompiledProfile(p)) for req, p in config.version_profiles]
        self._by_version: dict[Version, CompiledProfile] = {}

    def profile_for(self, version: Version) -> CompiledProfile:
        profile = self._by_version.get(version)
        if profile is None:
            profile = next((p for req, p in self.overrides if req.matches(version)), self.base)
            self._by_version[version] = profile
        return profile

    def may_receive(self, public: str) -> bool:
        return public in self.base.receives or any(public in p.receives for _, p in self.overrides)


class RoutingTable:
    def __init__(self, config: Config):
        self.config = config
        self.roles = {name: RoleRoutes(rc) for name, rc in config.roles.items()}
        receivers: dict[str, list[str]] = {}
        for name, role in self.roles.items():
            for profile in [role.base, *(p for _, p in role.overrides)]:
                for public in profile.receives:
                    if name not in receivers.setdefault(public, []):
                        receivers[public].append(name)
        self.receivers: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in receivers.items()}

    def receiving_roles(self, public: str) -> tuple[str, ...]:
        return self.receivers.get(public, ())
