import pytest

import nbflash


@pytest.fixture(autouse=True)
def no_remembered_calls():
    """Each test starts with empty memos (nbflash.plans.forget, the backward's too): a
    test that changes the dispatch (NBFLASH_WGMMA, a tile override, a patched spec) must
    not replay launches an earlier test remembered."""
    nbflash.plans.forget()
    yield


def pytest_collection_modifyitems(config, items):
    if not nbflash.SIMULATOR:
        return
    skip = pytest.mark.skip(reason="gpu tier: no GPU here, kernels run on Numba's CUDA simulator")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Start the compile gates' workers in the background (tests/gate_jobs.py) and run
    the gate tests last, so their compiles overlap the simulator tests."""
    import gate_jobs

    names = []
    for item in session.items:
        name = gate_jobs.module_gate(str(item.fspath))
        if name and name not in names:
            names.append(name)
    if names:
        gates = [i for i in session.items if gate_jobs.module_gate(str(i.fspath))]
        others = [i for i in session.items if not gate_jobs.module_gate(str(i.fspath))]
        session.items[:] = others + gates
        gate_jobs.start(names)
