"""The suite's own set-up: the xdist groups of tests/conftest.py are names pytest-xdist reads."""
from __future__ import annotations

import collections


def xdist_scope(nodeid: str) -> str:
    """The work unit pytest-xdist's --dist loadgroup puts a test in (xdist 3.x's rule): the part
    after the last "@", but only when no "]" follows it; else the test alone."""
    return nodeid.split("@")[-1] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid


def test_tests_sharing_a_module_fixture_land_in_one_xdist_unit(request):
    """Checked on the session's tests: under a plain `pytest`, all of them."""
    units = collections.defaultdict(list)
    for item in request.session.items:
        marker = item.get_closest_marker("xdist_group")
        if marker is None:
            continue
        group = marker.args[0]
        nodeid = item.nodeid if item.nodeid.endswith(f"@{group}") else f"{item.nodeid}@{group}"
        assert xdist_scope(nodeid) == group, f"xdist would not read the group of {item.nodeid}"
        units[group].append(item.nodeid)
    # e.g. every test on the CLI-trained resnet9 shares one unit, so that it trains once
    cli = [g for g in units if g.startswith("test_cli.py/")]
    assert not cli or all(len(units[g]) > 1 for g in cli), {g: len(units[g]) for g in cli}
