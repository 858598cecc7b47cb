"""Every name re-exported by ``gflowgr_core`` resolves to the object of its home module."""
import importlib

import pytest

import gflowgr_core


@pytest.mark.parametrize("name", sorted(gflowgr_core._EXPORTS))
def test_export_resolves(name):
    home = importlib.import_module(gflowgr_core._EXPORTS[name])
    assert getattr(gflowgr_core, name) is getattr(home, name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gflowgr_core.nope
