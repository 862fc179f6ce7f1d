"""A helper for tests that compare measurement tables."""

import numpy as np


def assert_same_table(table, reference) -> None:
    """``table`` (a DataFrame read back from CSV) has ``reference``'s columns and rows: class
    names equal, numbers equal to 1e-9 (CSV round trip)."""
    assert list(table.columns) == list(reference.columns) and len(table) == len(reference)
    for column in table.columns:
        if column == "class_name":
            assert list(table[column]) == list(reference[column])
        else:
            np.testing.assert_allclose(table[column], reference[column], rtol=1e-9, atol=1e-9)
