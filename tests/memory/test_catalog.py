"""The torch-free catalogue (what the CLI lists and checks) says what the policy classes say, in the same order."""

from __future__ import annotations

import dataclasses

import segcli.memory
from segcli.memory import CATALOG, POLICY_NAMES, REGISTRY, make_policy
from segcli.memory.base import MemoryPolicy
from segcli.memory.catalog import PolicyInfo


def test_catalog_names_the_registered_classes_in_their_order():
    assert tuple(CATALOG) == tuple(REGISTRY) == POLICY_NAMES


def test_catalog_entries_equal_the_classes_attributes():
    for name, cls in REGISTRY.items():
        assert CATALOG[name] == PolicyInfo(**{f.name: getattr(cls, f.name) for f in dataclasses.fields(PolicyInfo)})


def test_the_package_hands_out_the_classes_and_policies():
    assert segcli.memory.MemoryPolicy is MemoryPolicy
    assert all(issubclass(cls, MemoryPolicy) for cls in REGISTRY.values())
    assert type(make_policy("fifo", memory_size=8)) is REGISTRY["fifo"]
