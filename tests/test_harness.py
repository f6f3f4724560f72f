"""The test harness itself (tests/conftest.py): its NaN-poisoned factories must not change where tensors are made."""

import torch


def test_device_context_still_places_new_modules():
    with torch.device("meta"):
        lin = torch.nn.Linear(3, 4)
        t = torch.empty(2)
    assert lin.weight.device.type == "meta" and t.device.type == "meta"


def test_empty_is_poisoned():
    assert torch.isnan(torch.empty(3)).all()
