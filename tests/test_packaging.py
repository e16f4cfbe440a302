"""The dependency floors that .ci/run's second pass installs (.ci/floors.txt) are the
lower bounds pyproject.toml declares: raising one without the other would test
versions no user can have, or leave a floor untested."""

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # (Python 3.10, which the package supports, has no tomllib)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# Where the floors pass knowingly installs more than the floor (see .ci/floors.txt).
ABOVE_THE_FLOOR = {"click": "8.2.0"}


def declared_floors() -> dict[str, str]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for requirement in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement.replace(" ", "").split(";")[0])
        assert match, f"{requirement!r}: every dependency is declared with a lower bound only"
        floors[match[1].lower().replace("-", "_")] = match[2]
    return floors


def pinned_floors() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("-", "_")] = version
    return pins


def same_version(a: str, b: str) -> bool:
    """1.24 and 1.24.0 are one version."""
    def parts(version: str) -> list[int]:
        numbers = [int(x) for x in version.split(".")]
        return numbers + [0] * (3 - len(numbers))
    return parts(a) == parts(b)


def test_the_floors_pass_installs_the_declared_floors():
    declared, pinned = declared_floors(), pinned_floors()
    assert set(pinned) == set(declared) - {"torch"}, "every dependency but torch has its floor pinned"
    for name, version in pinned.items():
        assert same_version(version, ABOVE_THE_FLOOR.get(name, declared[name])), \
            f"{name}: pyproject.toml says >={declared[name]}, .ci/floors.txt installs {version}"
    for name, version in ABOVE_THE_FLOOR.items():
        assert not same_version(version, declared[name]), f"{name} is at its floor now: drop it from ABOVE_THE_FLOOR"
