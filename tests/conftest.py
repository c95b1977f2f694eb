"""Tiny random models on every TransformerLens class this line of TransformerLens has."""

from __future__ import annotations

import os

import pytest
from support.models import model_params


@pytest.fixture(params=list(model_params()))
def model_case(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TL_DECOMP_NETWORK") == "1":
        return
    skip = pytest.mark.skip(reason="needs the Hugging Face hub; set TL_DECOMP_NETWORK=1")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)
