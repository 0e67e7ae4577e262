import pytest

import nbflash


def pytest_collection_modifyitems(config, items):
    if not nbflash.SIMULATOR:
        return
    skip = pytest.mark.skip(reason="gpu tier: no GPU here, kernels run on Numba's CUDA simulator")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
