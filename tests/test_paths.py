"""Paths in the tree: one dialect for import --path, export --subtree and the paths in errors."""

from __future__ import annotations

from typing import Any

import pytest

from snaptree import ArgumentError
from snaptree.paths import find, join, key_in, parse, path_of, resolve
from snaptree.tree import FlatMapping, List, Mapping


@pytest.mark.parametrize(
    ("text", "segments"),
    [("/", ()), ("a", ("a",)), ("/a/b/", ("a", "b")), (" a/0 ", ("a", "0"))],
)
def test_a_path_is_keys_joined_by_slashes_and_slash_alone_is_the_root(text, segments):
    assert parse(text) == segments
    assert join(segments) == ("/" if not segments else "/".join(segments))


@pytest.mark.parametrize("text", ["", "  ", "a//b"])
def test_an_empty_path_or_segment_is_an_argument_error_not_the_root(text):
    with pytest.raises(ArgumentError, match="empty"):
        parse(text, what="import path")


def test_a_segment_names_a_str_key_else_the_int_it_spells():
    assert key_in(Mapping({"7": 1}), "7") == "7"
    assert key_in(Mapping({7: 1}), "7") == 7
    assert key_in(FlatMapping({7: 1, "a": 2}), "7") == 7
    with pytest.raises(ArgumentError, match=r"^a: there is no key '8' there"):
        key_in(Mapping({7: 1}), "8", where="a")


def test_creating_a_key_takes_the_int_it_spells_in_an_int_keyed_mapping():
    assert key_in(Mapping({1: "x"}), "2", creating=True) == 2
    assert key_in(Mapping({"a": "x"}), "2", creating=True) == "2"
    assert key_in(Mapping(), "2", creating=True) == "2"


def test_a_list_segment_is_an_existing_index():
    items = List([0, 1, 2])
    assert key_in(items, "-1") == -1
    with pytest.raises(ArgumentError, match=r"^items: no item 3 in a list of 3"):
        key_in(items, "3", where="items", creating=True)
    with pytest.raises(ArgumentError, match="a list index must be a number, not 'x'"):
        key_in(items, "x")


def test_resolve_names_how_far_it_got():
    tree: Any = {"a": {"b": [10, {"c": 5}]}}
    assert resolve(tree, "a/b/1/c") == 5
    with pytest.raises(ArgumentError, match=r"a/b/0/c: the value at a/b/0 is a int"):
        resolve(tree, "a/b/0/c")


def test_find_looks_breadth_first_and_gives_up_at_its_limit():
    tree = {"deep": {"x": {"target": 1}}, "shallow": {"target": 2}}
    assert find(tree, lambda value: value == 2, limit=100) == "shallow/target"
    assert find(tree, lambda value: value == 1, limit=100) == "deep/x/target"
    assert find(tree, lambda value: value == 1, limit=3) is None


def test_path_of_a_node_searches_its_tree_from_the_root(store):
    def where(root: Any) -> tuple[Any, ...]:
        root["accounts"] = {"a1": {"entries": [{"n": 1}]}}
        entry = root["accounts"]["a1"]["entries"][0]
        return path_of(root), path_of(entry), path_of(Mapping())

    assert store.run(where) == ("", "accounts/a1/entries/0", None)
    assert path_of(Mapping()) is None  # outside any store call
