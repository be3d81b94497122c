import pytest
from hypothesis import given
from hypothesis import strategies as st

from exocom.core.versions import InvalidRequirement, InvalidVersion, Requirement, Version


def test_semver_precedence():
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
               "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2.0", "2.0.0", "10.0.0"]
    versions = [Version(v) for v in ordered]
    assert sorted(reversed(versions)) == versions


@pytest.mark.parametrize("text", ["banana", "1", "1.2", "01.2.3", "1.2.3.4", "", "v1.2.3", "1.2.3-",
                                  "1.0.0\n", "\u0661.0.0", "1.0.0-" + "1" * 5000, "9" * 5000 + ".0.0", ["1.0.0"], 5])
def test_invalid_versions(text):
    with pytest.raises(InvalidVersion):
        Version(text)


def test_requirements():
    assert Requirement("2").matches(Version("2.5.1"))
    assert not Requirement("2").matches(Version("3.0.0"))
    assert Requirement("2.1").matches(Version("2.1.9"))
    assert not Requirement("2.1").matches(Version("2.2.0"))
    assert Requirement("2.1.3").matches(Version("2.1.3"))
    assert not Requirement("2.1.3").matches(Version("2.1.3-rc.1"))
    assert not Requirement("2.1.3").matches(Version("2.1.4"))
    for bad in ("x", "2.", "^2", "2.1.3.4", 2, "2\n", "\u0662", "9" * 5000, [[[]]]):
        with pytest.raises(InvalidRequirement):
            Requirement(bad)


@given(st.tuples(*[st.integers(0, 50)] * 3), st.tuples(*[st.integers(0, 50)] * 3))
def test_order_matches_numeric_tuples(a, b):
    va, vb = Version("%d.%d.%d" % a), Version("%d.%d.%d" % b)
    assert (va < vb) == (a < b)
    assert (va == vb) == (a == b)
