"""The guard of the Meta parity tests (conftest.import_meta): a module that cannot be imported fails
the test under CI, where tools/setup_env.sh installs Meta's package, and skips it elsewhere."""

from __future__ import annotations

import json

import pytest
from conftest import import_meta, in_ci

MISSING = "sam3_train_no_such_module.model"  # stands for a missing or broken ``sam3``


@pytest.mark.parametrize("value", ["true", "1", "True"])
def test_missing_reference_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=f"cannot import {MISSING}.*the install is broken.*sam3==0.1.4"):
        import_meta(MISSING)


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_missing_reference_skips_outside_ci(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match=f"cannot import {MISSING}.*sam3==0.1.4") as skipped:
        import_meta(MISSING)
    assert "broken" not in str(skipped.value)


@pytest.mark.parametrize("value", [None, "true"])
def test_present_module_is_returned(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert import_meta("json") is json
