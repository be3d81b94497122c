import json

import pytest

from exocom.core.config import ConfigError, from_service_data_env, load, parse_service_data, parse_text


def test_missing_lists_mean_empty():
    config = parse_service_data({"web": {}}, "t")
    assert config.roles["web"].profile.sends == ()
    assert config.to_service_data()["web"] == {"receives": [], "sends": [], "translations": []}


@pytest.mark.parametrize("data, fragment", [
    ({"web": {"sends": "users create"}}, "role 'web': key 'sends'"),
    ({"web": {"receives": [1]}}, "role 'web': key 'receives'"),
    ({"users": {"translations": [{"public": "a"}]}}, "role 'users': translations[0]"),
    ({"d": {"deploys": "nobody@1.0.0"}}, "role 'd': key 'deploys' names role 'nobody'"),
    ({"s": {}, "d": {"deploys": "s@1.0"}}, "role 'd': key 'deploys'"),
    ({"s": {}, "d": {"deploys": "s@1.0.0", "stepTimeout": -1}}, "role 'd': key 'stepTimeout'"),
    ({"s": {"versions": {"x": {}}}}, "role 's': versions"),
    ({"s": {}, "d1": {"deploys": "s@1.0.0"}, "d2": {"deploys": "s@1.0.0"}}, "more than one role deploys s@1.0.0"),
    ({}, "non-empty object"),
    ([], "non-empty object"),
])
def test_invalid_configurations_name_role_and_key(data, fragment):
    with pytest.raises(ConfigError) as e:
        parse_service_data(data, "t")
    assert fragment in str(e.value)


def test_service_data_env():
    with pytest.raises(ConfigError, match="empty"):
        from_service_data_env("  ")
    with pytest.raises(ConfigError, match="not valid JSON"):
        from_service_data_env("{nope")
    config = from_service_data_env(json.dumps({"web": {"sends": ["a"]}}))
    assert config.source == "SERVICE_DATA"


def test_the_parser_ignores_unknown_keys_as_the_go_broker_did():
    # Reporting them is the check's job (exocom/check.py), for serve and check-config alike.
    config = parse_service_data({"web": {"sends": ["a"], "colour": "red"}}, "t")
    assert config.roles["web"].profile.sends == ("a",)


def test_yaml_and_version_profiles():
    config = parse_text("""
todos:
  receives: [todos.list]
  sends: [todos.listing]
  versions:
    "2":
      receives: [todos.list, todos.search]
    "2.1":
      sends: [todos.listing, todos.found]
""", "f.yml")
    role = config.roles["todos"]
    assert [r.text for r, _ in role.version_profiles] == ["2.1", "2"]
    # An override inherits what it does not set from the role.
    assert role.version_profiles[0][1].receives == ("todos.list",)
    assert role.version_profiles[1][1].receives == ("todos.list", "todos.search")


def test_precedence_file_then_env_then_default(tmp_path):
    f = tmp_path / "routes.json"
    f.write_text(json.dumps({"fromfile": {}}))
    assert list(load(str(f), {"SERVICE_DATA": '{"fromenv": {}}'}).roles) == ["fromfile"]
    assert list(load(None, {"SERVICE_DATA": '{"fromenv": {}}'}).roles) == ["fromenv"]
    default = load(None, {})
    assert default.source == "embedded default"
    assert {"web", "todos", "todo-search", "todo-search-deployment"} <= set(default.roles)
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.yml"), {})
