"""Hypothesis strategies the import tests share: what ``json.load`` can give."""

from __future__ import annotations

from hypothesis import strategies as st

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=2**200)  # past what a 64-bit parser keeps
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_trees = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=30,
)
