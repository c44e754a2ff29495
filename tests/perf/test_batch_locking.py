"""A batch holds its unit's lock from start to end, so an invalidation (which takes the same lock through
the registers) cannot land between a batch's walk and its IOTLB fill."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from iommusim.bench.subjects import NO_SUPERPAGES, default_factory, make_subject
from iommusim.hw.batch import BatchTranslator
from iommusim.machine.memory import MachineMemory
from iommusim.perms import Perm
from iommusim.platform import VENDORS

HW = [v for v in ("vtd", "amd", "smmu") if v in VENDORS]


@pytest.mark.parametrize("vendor", HW)
@pytest.mark.parametrize("use_iotlb", [True, False])
def test_no_one_takes_the_units_lock_in_the_middle_of_a_batch(
    vendor: str, use_iotlb: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make_subject(default_factory, vendor, 64, superpages=NO_SUPERPAGES)
    s.map_all()
    route = s.platform.machine.dma.route_of(s.device)
    assert route is not None
    unit = route.unit
    assert isinstance(unit, BatchTranslator)
    lock = unit.lock
    daddrs = np.arange(8, dtype=np.uint64) << np.uint64(12)
    unit.translate_batch(route.source_id, daddrs, Perm.R, use_iotlb=use_iotlb)  # warm the context caches
    if use_iotlb:
        unit.translate_batch(route.source_id, daddrs + np.uint64(64 << 12), Perm.R, use_iotlb=False)

    taken_mid_batch: list[bool] = []
    real_gather = MachineMemory.gather_slots

    def gather_and_probe(self: MachineMemory, *args: Any, **kwargs: Any) -> Any:
        # Another thread (an invalidation, say) tries the unit's lock while the batch is walking.
        def probe() -> None:
            got = lock.acquire(timeout=0.05)
            if got:
                lock.release()
            taken_mid_batch.append(got)

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        return real_gather(self, *args, **kwargs)

    monkeypatch.setattr(MachineMemory, "gather_slots", gather_and_probe)
    unit.translate_batch(route.source_id, daddrs + np.uint64(32 << 12), Perm.R, use_iotlb=use_iotlb)
    assert taken_mid_batch, "the batch did not walk memory"
    assert not any(taken_mid_batch), "another thread took the unit's lock in the middle of a batch"
