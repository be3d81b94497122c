"""The routing configuration: which role sends and receives what, and which
role deploys which version of another.

It comes from a file (YAML or JSON), from the `SERVICE_DATA` environment
variable exactly as the Go broker reads it, or from the default embedded in
the package. Every problem is reported with the role and key it concerns.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .versions import InvalidRequirement, InvalidVersion, Requirement, Version

# The keys `exocom/check.py` knows; this parser ignores others, as the Go broker did.
ROLE_KEYS = {"receives", "sends", "translations", "deploys", "stepTimeout", "versions", "rollout",
             "tokenFile", "tokenEnv", "tokenSha256"}
# How a role names its credential (one of them); the shell turns a reference into a digest.
CREDENTIAL_KEYS = ("tokenFile", "tokenEnv", "tokenSha256")
ROLLOUT_KEYS = {"steps", "interval", "gates"}
GATE_KEYS = {"minSamples", "errorMessages", "maxErrorRate", "maxReplyTimeRatio", "maxDisconnects"}
PROFILE_KEYS = {"receives", "sends", "translations"}


class ConfigError(ValueError):
    """A configuration problem a person can fix; the message says where."""


@dataclass(frozen=True)
class Translation:
    public: str
    internal: str


@dataclass(frozen=True)
class Profile:
    """What a role (or some versions of it) sends and receives, by internal name."""

    receives: tuple[str, ...] = ()
    sends: tuple[str, ...] = ()
    translations: tuple[Translation, ...] = ()


@dataclass(frozen=True)
class Deploys:
    role: str
    version: Version

    def __str__(self) -> str:
        return f"{self.role}@{self.version}"


@dataclass(frozen=True)
class Gates:
    """What a ramping version's own figures must stay within (contract 7.3);
    None: that gate is not checked."""

    min_samples: int = 20
    error_messages: tuple[str, ...] = ()
    max_error_rate: float | None = None
    max_reply_time_ratio: float | None = None
    max_disconnects: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"minSamples": self.min_samples, "errorMessages": list(self.error_messages),
                "maxErrorRate": self.max_error_rate, "maxReplyTimeRatio": self.max_reply_time_ratio,
                "maxDisconnects": self.max_disconnects}


@dataclass(frozen=True)
class Rollout:
    """A gradual rollout (contract 7): shares in percent, in order, the last one 100."""

    steps: tuple[float, ...]
    interval: float
    gates: Gates = Gates()

    def to_json(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "interval": self.interval, "gates": self.gates.to_json()}


@dataclass(frozen=True)
class Credential:
    """A role's token, as the routing file names it (`key` one of CREDENTIAL_KEYS).

    `sha256` is the digest registrations are checked against: given by
    `tokenSha256`, or filled in by the shell from the file or variable
    (`server.credentials.resolve`); None until then, which refuses every
    registration of the role (never open by mistake)."""

    key: str
    reference: str
    sha256: bytes | None = None

    def __repr__(self) -> str:  # the digest stays out of tracebacks and logs too
        return f"Credential({self.key}={self.reference if self.key != 'tokenSha256' else '...'})"


@dataclass(frozen=True)
class RoleConfig:
    name: str
    profile: Profile
    version_profiles: tuple[tuple[Requirement, Profile], ...] = ()
    deploys: Deploys | None = None
    step_timeout: float | None = None
    rollout: Rollout | None = None
    credential: Credential | None = None


@dataclass(frozen=True)
class Config:
    roles: dict[str, RoleConfig]
    source: str

    @property
    def open_roles(self) -> list[str]:
        """The roles anyone who reaches the port may register as."""
        return sorted(name for name, role in self.roles.items() if role.credential is None)

    @property
    def has_security(self) -> bool:
        return "security" in self.roles

    def deployments(self) -> list[tuple[str, Deploys, float | None]]:
        return [(r.name, r.deploys, r.step_timeout) for r in self.roles.values() if r.deploys]

    def to_service_data(self) -> dict[str, Any]:
        """The normalized routes, in the shape `/config.json` shows them."""
        out: dict[str, Any] = {}
        for name, role in self.roles.items():
            entry = _profile_json(role.profile)
            if role.version_profiles:
                entry["versions"] = {req.text: _profile_json(p) for req, p in role.version_profiles}
            if role.deploys:
                entry["deploys"] = str(role.deploys)
            if role.step_timeout is not None:
                entry["stepTimeout"] = role.step_timeout
            if role.rollout is not None:
                entry["rollout"] = role.rollout.to_json()
            if role.credential is not None:
                entry["credential"] = role.credential.key  # how, never the token nor its digest
            out[name] = entry
        return out


def _profile_json(p: Profile) -> dict[str, Any]:
    return {
        "receives": list(p.receives),
        "sends": list(p.sends),
        "translations": [{"public": t.public, "internal": t.internal} for t in p.translations],
    }


def _names(role: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"role {role!r}: key {key!r} must be a list of message names, got {value!r}")
    return tuple(value)


def _translations(role: str, key: str, value: Any) -> tuple[Translation, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"role {role!r}: key {key!r} must be a list of {{public, internal}} objects")
    out = []
    seen_public: set[str] = set()
    seen_internal: set[str] = set()
    for i, t in enumerate(value):
        if not (isinstance(t, dict) and isinstance(t.get("public"), str) and isinstance(t.get("internal"), str)):
            raise ConfigError(f"role {role!r}: {key}[{i}] must have string keys 'public' and 'internal', got {t!r}")
        if t["public"] in seen_public or t["internal"] in seen_internal:
            raise ConfigError(f"role {role!r}: {key}[{i}] translates {t['public']!r}/{t['internal']!r} a second time")
        seen_public.add(t["public"])
        seen_internal.add(t["internal"])
        out.append(Translation(t["public"], t["internal"]))
    return tuple(out)


def _profile(role: str, data: dict[str, Any], prefix: str, inherit: Profile | None = None) -> Profile:
    def get(key: str, parse, default):
        if key in data:
            return parse(role, prefix + key, data[key])
        return default

    base = inherit or Profile()
    return Profile(
        receives=get("receives", _names, base.receives),
        sends=get("sends", _names, base.sends),
        translations=get("translations", _translations, base.translations),
    )


def parse_service_data(data: Any, source: str) -> Config:
    """Validate the routing data (already decoded from JSON or YAML)."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: the routing configuration must be a non-empty object keyed by role")
    roles: dict[str, RoleConfig] = {}
    for name, entry in data.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{source}: role names must be non-empty strings, got {name!r}")
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError(f"role {name!r}: must be an object with receives/sends/translations, got {entry!r}")
        profile = _profile(name, entry, "")
        version_profiles = []
        versions = entry.get("versions") or {}
        if not isinstance(versions, dict):
            raise ConfigError(f"role {name!r}: key 'versions' must map a version requirement (\"2\", \"2.1\") to receives/sends")
        for req_text, override in versions.items():
            try:
                req = Requirement(str(req_text))
            except InvalidRequirement as e:
                raise ConfigError(f"role {name!r}: versions: {e}") from None
            if not isinstance(override, dict):
                raise ConfigError(f"role {name!r}: versions.{req_text} must be an object")
            version_profiles.append((req, _profile(name, override, f"versions.{req_text}.", inherit=profile)))
        # The most specific requirement wins when several match a version.
        version_profiles.sort(key=lambda rp: -len(rp[0].parts))
        deploys = None
        if entry.get("deploys") is not None:
            deploys = _deploys(name, entry["deploys"])
        step_timeout = entry.get("stepTimeout")
        if step_timeout is not None and (
            isinstance(step_timeout, bool) or not isinstance(step_timeout, (int, float)) or step_timeout <= 0
        ):
            raise ConfigError(f"role {name!r}: key 'stepTimeout' must be a positive number of seconds, got {step_timeout!r}")
        rollout = parse_rollout(name, entry["rollout"]) if entry.get("rollout") is not None else None
        if rollout is not None and deploys is None:
            raise ConfigError(f"role {name!r}: key 'rollout' needs 'deploys' (it ramps the version this role deploys)")
        roles[name] = RoleConfig(name, profile, tuple(version_profiles), deploys, step_timeout, rollout,
                                 parse_credential(name, entry))
    for role in roles.values():
        if role.deploys:
            if role.deploys.role not in roles:
                raise ConfigError(f"role {role.name!r}: key 'deploys' names role {role.deploys.role!r}, which is not configured")
            if role.deploys.role == role.name:
                raise ConfigError(f"role {role.name!r}: key 'deploys' cannot name the role itself")
    targets = [str(r.deploys) for r in roles.values() if r.deploys]
    for t in set(targets):
        if targets.count(t) > 1:
            raise ConfigError(f"{source}: more than one role deploys {t}; each version has one deployment script")
    return Config(roles, source)


def parse_credential(role: str, entry: dict[str, Any]) -> Credential | None:
    """The one credential key of a role entry, checked; the token itself is never in the message."""
    given = [k for k in CREDENTIAL_KEYS if entry.get(k) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ConfigError(f"role {role!r}: give one of {', '.join(CREDENTIAL_KEYS)}, not "
                          f"{' and '.join(map(repr, given))}")
    key = given[0]
    value = entry[key]
    if key == "tokenSha256":
        if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)):
            raise ConfigError(f"role {role!r}: key 'tokenSha256' must be the SHA-256 of the token as 64 hex digits "
                              "(`printf %s TOKEN | sha256sum`)")
        return Credential(key, "", bytes.fromhex(value))
    if not isinstance(value, str) or not value:
        what = "a file path" if key == "tokenFile" else "an environment variable name"
        raise ConfigError(f"role {role!r}: key {key!r} must be {what}, got {value!r}")
    return Credential(key, value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_rollout(role: str, value: Any) -> Rollout:
    """The `rollout` of a deployment; every problem names the key."""
    where = f"role {role!r}: key 'rollout"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}' must be an object with steps, interval and gates, got {value!r}")
    unknown = sorted(set(value) - ROLLOUT_KEYS)
    if unknown:
        raise ConfigError(f"{where}' has unknown key(s) {', '.join(map(repr, unknown))}; known: steps, interval, gates")
    steps = value.get("steps")
    if not (isinstance(steps, list) and steps and all(_number(s) and 0 < s <= 100 for s in steps)):
        raise ConfigError(f"{where}.steps' must be a list of shares in percent (0 < share <= 100), got {steps!r}")
    if any(b <= a for a, b in zip(steps, steps[1:])) or steps[-1] != 100:
        raise ConfigError(f"{where}.steps' must rise step by step and end at 100, got {steps!r}")
    interval = value.get("interval", 60)
    if not _number(interval) or interval <= 0:
        raise ConfigError(f"{where}.interval' must be a positive number of seconds, got {interval!r}")
    gates = value.get("gates") or {}
    if not isinstance(gates, dict):
        raise ConfigError(f"{where}.gates' must be an object, got {gates!r}")
    unknown = sorted(set(gates) - GATE_KEYS)
    if unknown:
        raise ConfigError(f"{where}.gates' has unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(sorted(GATE_KEYS))}")

    def limit(key: str, check, what: str):
        v = gates.get(key)
        if v is not None and not (_number(v) and check(v)):
            raise ConfigError(f"{where}.gates.{key}' must be {what}, got {v!r}")
        return v

    min_samples = limit("minSamples", lambda v: v >= 1 and v == int(v), "a whole number of replies >= 1")
    return Rollout(tuple(float(s) for s in steps), float(interval), Gates(
        min_samples=int(min_samples) if min_samples is not None else Gates.min_samples,
        error_messages=_names(role, "rollout.gates.errorMessages", gates.get("errorMessages")),
        max_error_rate=limit("maxErrorRate", lambda v: 0 <= v <= 1, "a fraction between 0 and 1"),
        max_reply_time_ratio=limit("maxReplyTimeRatio", lambda v: v > 0, "a positive ratio"),
        max_disconnects=limit("maxDisconnects", lambda v: v >= 0 and v == int(v), "a whole number >= 0"),
    ))


def _deploys(role: str, value: Any) -> Deploys:
    if not isinstance(value, str) or value.count("@") != 1:
        raise ConfigError(f"role {role!r}: key 'deploys' must look like \"todo-search@0.0.1\", got {value!r}")
    try:
        return parse_deployment(value)
    except ValueError as e:
        raise ConfigError(f"role {role!r}: key 'deploys': {e}") from None


def parse_deployment(text: str) -> Deploys:
    """`ROLE@VERSION` as an operator names a deployment (`deploys`, `exocom
    deployments retry`, `POST /deployments/ROLE@VERSION/retry`)."""
    role, at, version = text.partition("@")
    if not role or not at or "@" in version:
        raise ValueError(f"{text!r} does not name a deployment: give ROLE@VERSION, e.g. todo-search@0.0.1")
    try:
        return Deploys(role, Version(version))
    except InvalidVersion as e:
        raise ValueError(f"{text!r}: {e}") from None


def load_file(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {str(p)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read configuration file {str(p)!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_text(text, str(p))


def parse_text(text: str, source: str) -> Config:
    import yaml  # YAML is a superset of JSON: one parser reads both file kinds

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML or JSON: {e}") from None
    return parse_service_data(data, source)


def from_service_data_env(value: str) -> Config:
    if not value.strip():
        raise ConfigError("SERVICE_DATA is set but empty: give it the routing JSON, or unset it to use the default")
    try:
        data = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"SERVICE_DATA is not valid JSON: {e}") from None
    return parse_service_data(data, "SERVICE_DATA")


def default_config_text() -> tuple[str, str]:
    """The embedded default (the tutorial's todo application)."""
    packaged = resources.files("exocom").joinpath("default-config.yml")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8"), "embedded default"
    # Running from a source checkout: the default is the file in config/.
    source = Path(__file__).resolve().parents[2] / "config" / "todo-app.yml"
    return source.read_text(encoding="utf-8"), "embedded default"


def load(config_file: str | None, environ: dict[str, str]) -> Config:
    """Pick the configuration the way `exocom serve` documents it."""
    if config_file:
        return load_file(config_file)
    if "SERVICE_DATA" in environ:
        return from_service_data_env(environ["SERVICE_DATA"])
    text, source = default_config_text()
    return parse_text(text, source)
