"""`exocom check-config FILE`: every problem of a routing file, not just the first.

This check reads the whole file and lists each problem with its line, role
and key. `exocom serve` runs the same check (`load_checked`): one validator,
one verdict, so a file with errors stops the start too.

errors (exit code 1)
    a key exocom does not know (a typo such as `recieves` would route
    nothing), a value of the wrong type, a version or requirement that
    does not parse, `deploys` naming a role that is not configured (or the
    role itself, or a version another role deploys too), a translation of a
    public or internal name given twice, a role or key given twice (YAML
    keeps only the last), and a name some role sends that no role receives
    (the broker would log "message undeliverable" for each one).
warnings (exit code unchanged)
    a name some role receives that no role sends, a name listed twice,
    `stepTimeout` without `deploys`.

Whatever these checks find, the file is then parsed exactly as `exocom serve`
parses it (`config.parse_service_data`), so a file reported clean is one the
broker accepts.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ..core.config import (CREDENTIAL_KEYS, PROFILE_KEYS, ROLE_KEYS, Config, ConfigError, default_config_text, load,
                           parse_credential, parse_rollout, parse_service_data)
from ..core.versions import InvalidRequirement, InvalidVersion, Requirement, Version
from ..server import credentials
from ..server.reloading import Reloader

ERROR, WARNING = "error", "warning"
SECURITY_ROLE = "security"
# Messages the security role sends to the broker itself (no `sends` needed),
# and the ones the broker sends (no role needs to list them in its `sends`).
SECURITY_ANSWERS = {"message authorized", "message unauthorized", "security request"}
BROKER_SENDS_WITH_SECURITY = {"authorize message", "security response", "message unauthorized"}


@dataclass(frozen=True)
class Problem:
    severity: str
    location: str
    message: str
    line: int | None = None

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.severity}: {self.location}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "location": self.location, "line": self.line, "message": self.message}


def _location(role: Any, key: str | None = None) -> str:
    if role is None:
        return "file"
    return f"role {role!r}" + (f", key {key!r}" if key else "")


def _suggest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.75)
    return f" (did you mean {match[0]!r}?)" if match else ""


class _Checker:
    def __init__(self, lines: dict[tuple, int]):
        self.lines = lines
        self.problems: list[Problem] = []

    def add(self, severity: str, path: tuple, message: str, line: int | None = None) -> None:
        role = path[0] if path else None
        key = _key_text(path[1:]) if len(path) > 1 else None
        for n in range(len(path), 0, -1):  # the most precise line known
            if line is not None:
                break
            line = self.lines.get(path[:n])
        problem = Problem(severity, _location(role, key), message, line)
        if problem not in self.problems:
            self.problems.append(problem)

    def error(self, path: tuple, message: str, line: int | None = None) -> None:
        self.add(ERROR, path, message, line)

    def warning(self, path: tuple, message: str) -> None:
        self.add(WARNING, path, message)


def _key_text(parts: tuple) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


# ---------------------------------------------------------------- YAML nodes


def _node_lines(node, checker: _Checker, path: tuple = ()) -> None:
    """Record the line of every key and list item, and report keys given twice."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                continue
            line = key_node.start_mark.line + 1
            child = (*path, key)
            if key in seen:
                what = "the role is defined" if not path else "the key is given"
                checker.error(child, f"{what} twice (lines {seen[key]} and {line}); YAML keeps only the last one",
                              line)
            else:
                seen[key] = line
                checker.lines[child] = line
            _node_lines(value_node, checker, child)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            checker.lines[(*path, i)] = item.start_mark.line + 1
            _node_lines(item, checker, (*path, i))


# ----------------------------------------------------------------- the checks


@dataclass
class _Profile:
    """A role's (or some versions') names, each with where it was written."""

    receives: list[tuple[tuple, str]]
    sends: list[tuple[tuple, str]]
    to_public: dict[str, str]


def _names(c: _Checker, path: tuple, value: Any) -> list[tuple[tuple, str]] | None:
    if value is None:
        return []
    if not isinstance(value, list):
        c.error(path, f"must be a list of message names, got {value!r}")
        return None
    out = []
    seen: dict[str, int] = {}
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name:
            c.error((*path, i), f"must be a message name (a non-empty string), got {name!r}")
            continue
        if name in seen:
            c.warning((*path, i), f"{name!r} is listed twice (first at [{seen[name]}])")
            continue
        seen[name] = i
        out.append(((*path, i), name))
    return out


def _translations(c: _Checker, path: tuple, value: Any) -> dict[str, str] | None:
    if value is None:
        return {}
    if not isinstance(value, list):
        c.error(path, f"must be a list of {{public, internal}} objects, got {value!r}")
        return None
    to_public: dict[str, str] = {}
    public_at: dict[str, int] = {}
    internal_at: dict[str, int] = {}
    for i, t in enumerate(value):
        if not isinstance(t, dict):
            c.error((*path, i), f"must be an object with 'public' and 'internal', got {t!r}")
            continue
        bad = [k for k in ("public", "internal") if not isinstance(t.get(k), str) or not t.get(k)]
        if bad:
            c.error((*path, i), " and ".join(repr(k) for k in bad) + f" must be a non-empty string, got {t!r}")
            continue
        for k in t:
            if k not in ("public", "internal"):
                c.error((*path, i, k), f"unknown key {k!r} in a translation (known: 'internal', 'public')")
        public, internal = t["public"], t["internal"]
        if public in public_at:
            c.error((*path, i), f"public name {public!r} is translated a second time (first at [{public_at[public]}])")
        if internal in internal_at:
            c.error((*path, i), f"internal name {internal!r} is translated a second time "
                                f"(first at [{internal_at[internal]}])")
        if public in public_at or internal in internal_at:
            continue
        public_at[public] = i
        internal_at[internal] = i
        to_public[internal] = public
    return to_public


def _profile(c: _Checker, path: tuple, data: dict, base: _Profile | None) -> _Profile:
    receives = _names(c, (*path, "receives"), data.get("receives")) if "receives" in data else None
    sends = _names(c, (*path, "sends"), data.get("sends")) if "sends" in data else None
    to_public = _translations(c, (*path, "translations"), data.get("translations")) if "translations" in data else None
    return _Profile(
        receives=receives if receives is not None else (base.receives if base else []),
        sends=sends if sends is not None else (base.sends if base else []),
        to_public=to_public if to_public is not None else (base.to_public if base else {}),
    )


def _unknown_keys(c: _Checker, path: tuple, data: dict, known: set[str]) -> None:
    for k in data:
        if k not in known:
            c.error((*path, str(k)), f"unknown key {k!r}{_suggest(str(k), known)}; "
                                     f"known keys: {', '.join(sorted(known))}")


def check_data(data: Any, source: str, lines: dict[tuple, int] | None = None,
               checker: _Checker | None = None) -> list[Problem]:
    """Every problem of decoded routing data."""
    c = checker or _Checker(lines or {})
    if not isinstance(data, dict) or not data:
        c.error((), "the routing configuration must be a non-empty mapping keyed by role, got "
                    f"{'an empty file' if data is None else repr(data)[:80]}")
        return c.problems

    profiles: dict[str, list[_Profile]] = {}
    deploys: dict[str, tuple[str, str]] = {}
    step_timeouts: set[str] = set()
    for name, entry in data.items():
        if not isinstance(name, str) or not name:
            c.error((str(name),), f"role names must be non-empty strings, got {name!r}")
            continue
        path = (name,)
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            c.error(path, f"must be a mapping with receives/sends/translations, got {entry!r}")
            continue
        _unknown_keys(c, path, entry, ROLE_KEYS)
        base = _profile(c, path, entry, None)
        role_profiles = [base]
        versions = entry.get("versions")
        if versions is not None and not isinstance(versions, dict):
            c.error((*path, "versions"), "must map a version requirement (\"2\", \"2.1\") to receives/sends/"
                                         f"translations, got {versions!r}")
        elif versions:
            for req_text, override in versions.items():
                vpath = (*path, "versions", str(req_text))
                try:
                    Requirement(str(req_text))
                except InvalidRequirement as e:
                    c.error(vpath, str(e))
                if not isinstance(override, dict):
                    c.error(vpath, f"must be a mapping with receives/sends/translations, got {override!r}")
                    continue
                _unknown_keys(c, vpath, override, PROFILE_KEYS)
                role_profiles.append(_profile(c, vpath, override, base))
        profiles[name] = role_profiles

        value = entry.get("deploys")
        if value is not None:
            if not isinstance(value, str) or value.count("@") != 1:
                c.error((*path, "deploys"), f"must look like \"todo-search@0.0.1\" (ROLE@VERSION), got {value!r}")
            else:
                target, version = value.split("@")
                try:
                    deploys[name] = (target, str(Version(version)))
                except InvalidVersion as e:
                    c.error((*path, "deploys"), str(e))
        timeout = entry.get("stepTimeout")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
                c.error((*path, "stepTimeout"), f"must be a positive number of seconds, got {timeout!r}")
            step_timeouts.add(name)
        rollout = entry.get("rollout")
        if rollout is not None:
            try:
                parse_rollout(name, rollout)
            except ConfigError as e:
                c.error((*path, "rollout"), str(e).removeprefix(f"role {name!r}: "))
            if entry.get("deploys") is None:
                c.error((*path, "rollout"), "needs 'deploys' (it ramps the version this role deploys)")
        try:
            parse_credential(name, entry)
        except ConfigError as e:
            key = next(k for k in CREDENTIAL_KEYS if entry.get(k) is not None)
            c.error((*path, key), str(e).removeprefix(f"role {name!r}: "))

    for name in sorted(step_timeouts - set(deploys)):
        if not (isinstance(data[name], dict) and data[name].get("deploys") is not None):
            c.warning((name, "stepTimeout"), "has no effect without 'deploys' (it limits the steps of a deployment)")
    deployed_by: dict[tuple[str, str], str] = {}
    for name, (target, version) in deploys.items():
        if target not in data:
            c.error((name, "deploys"), f"names role {target!r}, which is not configured{_suggest(target, data)}")
        elif target == name:
            c.error((name, "deploys"), "cannot name the role itself")
        if (target, version) in deployed_by:
            c.error((name, "deploys"), f"{target}@{version} is deployed by {deployed_by[(target, version)]!r} "
                                       "too; each version has one deployment script")
        else:
            deployed_by[(target, version)] = name

    _check_routes(c, profiles, deploys, has_security=SECURITY_ROLE in data)
    if not any(p.severity == ERROR for p in c.problems):
        # Whatever slipped through: the broker's own parser has the last word.
        try:
            parse_service_data(data, source)
        except ConfigError as e:
            c.error((), str(e))
    return c.problems


def _handshake_names(target: str, version: str) -> tuple[set[str], set[str]]:
    """The deployment messages: the broker sends the starts, the script answers."""
    starts, answers = set(), set()
    for step in ("offline", "online"):
        starts.add(f"deployment-{target}-{version}-{step}-start")
        answers.update(f"deployment-{target}-{version}-{step}-{outcome}" for outcome in ("done", "failed"))
    return starts, answers


def _check_routes(c: _Checker, profiles: dict[str, list[_Profile]], deploys: dict[str, tuple[str, str]],
                  has_security: bool) -> None:
    broker_sends: set[str] = set()
    broker_receives: set[str] = set()
    for target in deploys.values():
        starts, answers = _handshake_names(*target)
        broker_sends |= starts
        broker_receives |= answers
    if has_security:
        broker_sends |= BROKER_SENDS_WITH_SECURITY

    def public_names(kind: str):
        for role, role_profiles in profiles.items():
            for profile in role_profiles:
                for path, internal in getattr(profile, kind):
                    yield role, path, internal, profile.to_public.get(internal, internal)

    received = {public for _, _, _, public in public_names("receives")}
    sent = {public for _, _, _, public in public_names("sends")}
    for role, path, internal, public in public_names("sends"):
        if public in received or internal in broker_receives:
            continue
        if has_security and role == SECURITY_ROLE and internal in SECURITY_ANSWERS:
            continue
        named = f"{internal!r}" + (f" (public name {public!r})" if public != internal else "")
        c.error(path, f"sends {named}, which no role receives{_suggest(public, received)}")
    for role, path, internal, public in public_names("receives"):
        if public in sent or public in broker_sends:
            continue
        named = f"{internal!r}" + (f" (public name {public!r})" if public != internal else "")
        c.warning(path, f"receives {named}, which no role sends{_suggest(public, sent)}")


def check_text(text: str, source: str) -> list[Problem]:
    checker = _Checker({})
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = "; ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        where = f" (column {mark.column + 1})" if mark else ""
        checker.problems.append(Problem(ERROR, "file", f"not valid YAML or JSON: {what}{where}",
                                        mark.line + 1 if mark else None))
        return checker.problems
    if node is not None:
        _node_lines(node, checker)
    return check_data(data, source, checker=checker)


def check_file(path: str) -> list[Problem]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        return [Problem(ERROR, "file", f"cannot read the file: {e.strerror or e}")]
    except UnicodeDecodeError as e:
        return [Problem(ERROR, "file", f"cannot read the file: not UTF-8 text ({e.reason} at byte {e.start})")]
    return check_text(text, path)


def _by_line(problems: list[Problem]) -> list[Problem]:
    """Problems without a line (the whole file) first."""
    return sorted(problems, key=lambda p: p.line or 0)


class InvalidConfig(ConfigError):
    """The errors `exocom check-config` reports, stopping `exocom serve`."""

    def __init__(self, source: str, errors: list[Problem]):
        self.lines = [p.format(source) for p in _by_line(errors)]
        more = (f" (and {len(errors) - 1} more error{'s' * (len(errors) > 2)}: "
                f"`exocom check-config {source}` lists every problem)") if len(errors) > 1 else ""
        super().__init__(self.lines[0] + more)


def load_checked(config_file: str | None, environ) -> tuple[Config, list[str]]:
    """The configuration `exocom serve` runs with, and its warnings as
    `exocom check-config` words them.

    A file (or the embedded default) is judged exactly as check-config judges
    it: any error stops the start. `SERVICE_DATA` stops the start only on what
    the Go broker's reading refuses (`config.parse_service_data`); what else
    the check calls an error (unknown keys, a name sent that no role
    receives) becomes a warning there: that variable is generated by
    Exosphere from each service's free-form `dependency-data`, which may hold
    other keys, and the Go broker started with them."""
    if config_file or "SERVICE_DATA" not in environ:
        if config_file:
            source, problems = config_file, check_file(config_file)
        else:
            text, source = default_config_text()
            problems = check_text(text, source)
        errors = [p for p in problems if p.severity == ERROR]
        if errors:
            raise InvalidConfig(source, errors)
        base = Path(config_file).parent if config_file else Path.cwd()
        return (credentials.resolve(load(config_file, environ), environ, base),
                [p.format(source) for p in _by_line(problems)])
    config = load(None, environ)  # refuses what the Go broker refused, one line
    problems = check_data(json.loads(environ["SERVICE_DATA"]), "SERVICE_DATA")
    return (credentials.resolve(config, environ, Path.cwd()),
            [replace(p, severity=WARNING).format("SERVICE_DATA") for p in problems])


def reloader(config_file: str | None, environ) -> Reloader:
    """How `exocom serve` reads its configuration again on SIGHUP or `POST
    /reload`: the same source, the same verdict as at startup."""
    if config_file:
        return Reloader(config_file, load=lambda: load_checked(config_file, environ))
    if "SERVICE_DATA" in environ:
        return Reloader("SERVICE_DATA", refused=(
            "the configuration came from the SERVICE_DATA environment variable, which a running process cannot "
            "re-read: restart the broker with the new value, or start it with --config FILE to reload a file"))
    return Reloader(default_config_text()[1])


def check_config_command(path: str) -> int:
    problems = _by_line(check_file(path))
    for problem in problems:
        print(problem.format(path))
    errors = sum(p.severity == ERROR for p in problems)
    warnings = len(problems) - errors
    if errors:
        print(f"{path}: {errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}")
        return 1
    summary = f"{warnings} warning{'s' * (warnings != 1)}" if warnings else "no problems"
    print(f"{path}: OK ({summary})")
    return 0
