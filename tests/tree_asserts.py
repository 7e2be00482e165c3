"""Comparisons of a layer's numbers with the functional API's (shared by the module-system tests)."""

import numpy as np


def assert_ulps(actual, expected, ulps=8):
    """float32 agreement within ``ulps`` units in the last place of the array's largest magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ulps * np.finfo(np.float32).eps * np.abs(expected).max())


def assert_same_tree(actual, expected, ulps=None):
    """Same keys and dtypes; values bit for bit, or (``ulps``) floats within ``ulps`` and integers exact."""
    assert sorted(actual) == sorted(expected)
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, k
        if ulps is not None and np.issubdtype(np.asarray(expected[k]).dtype, np.floating):
            assert_ulps(actual[k], expected[k], ulps)
        else:
            np.testing.assert_array_equal(np.asarray(actual[k]), np.asarray(expected[k]), err_msg=k)
