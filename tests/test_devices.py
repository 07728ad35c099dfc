"""core/devices.py: the device a process scores on, and which failures are the machine's."""

from __future__ import annotations

import pytest
import torch

from anogan_batch.core import devices
from anogan_batch.errors import ConfigError, MachineError, describe_machine_failure


@pytest.fixture
def faults(monkeypatch):
    """Set the test-only failpoint for this test (its parse is cached per process)."""

    def set_faults(spec: str) -> None:
        monkeypatch.setenv(devices.FAULTS_ENV, spec)
        devices._faults.cache_clear()

    yield set_faults
    monkeypatch.delenv(devices.FAULTS_ENV, raising=False)
    devices._faults.cache_clear()
    devices._poisoned.clear()


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:3"])
def test_device_choices_are_accepted(value):
    devices.check_device(value)


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "CPU", "", "mps"])
def test_other_devices_are_refused_naming_the_field(value):
    with pytest.raises(ConfigError, match="'device'"):
        devices.check_device(value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
def test_without_cuda_auto_is_the_cpu_and_a_gpu_fails_loudly():
    assert devices.pick_device("auto") == "cpu"
    assert devices.pick_device("cpu", granted_gpus=["0"]) == "cpu"
    with pytest.raises(MachineError, match=r"asked for cuda but torch .* cannot use CUDA"):
        devices.pick_device("cuda")
    # Ray granted this process a GPU that torch cannot see: never a silent CPU fallback
    with pytest.raises(MachineError, match=r"granted GPU\(s\) \['1'\].*CUDA build"):
        devices.pick_device("auto", granted_gpus=["1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
def test_fake_gpus_score_on_the_cpu_only_under_the_failpoint(faults):
    faults("fake_gpu=1")
    assert devices.pick_device("auto", granted_gpus=["0"]) == "cpu"
    assert devices.pick_device("cuda") == "cpu"


def test_failures_of_the_machine_are_told_from_the_data(faults):
    assert devices.is_device_fault(torch.OutOfMemoryError("CUDA out of memory. Tried ..."))
    assert devices.is_device_fault(RuntimeError("CUDA error: an illegal memory access"))
    assert devices.is_device_fault(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    assert devices.is_device_fault(MachineError("no GPU"))
    assert not devices.is_device_fault(RuntimeError("injected fault"))
    assert not devices.is_device_fault(ValueError("shape mismatch"))


def test_the_failpoint_is_repeatable_and_sticky(faults):
    faults("oom=0.5,sticky=0.5")
    ids = [f"p{i}" for i in range(64)]
    ooms = []
    for i in range(0, 64, 2):
        try:
            devices.inject_oom(ids[i : i + 2])
            ooms.append(False)
        except torch.OutOfMemoryError:
            ooms.append(True)
    assert 4 < sum(ooms) < 28  # about half, and the same every run (a hash, not a draw)
    devices.inject_oom(["p0"])  # one patch never runs out of memory
    sticky = next(i for i in ids if devices._fraction(i) < 0.5)
    devices.inject_sticky([sticky], attempt=1)  # only its first attempt fails (repeat=1)
    with pytest.raises(RuntimeError, match="CUDA error"):
        devices.inject_sticky([sticky], attempt=0)
    # the context is poisoned: every later call in this process fails, as on a real GPU
    with pytest.raises(RuntimeError, match="CUDA error"):
        devices.inject_oom(["p0"])


def test_an_unknown_fault_is_refused(faults):
    faults("ooom=1")
    with pytest.raises(ConfigError, match="ooom"):
        devices.faults_injected()


def test_machine_failures_are_found_in_ray_wrappers():
    class TaskError(Exception):
        pass

    try:
        try:
            raise MachineError("a batch failed on 3 devices")
        except MachineError as e:
            raise TaskError("task failed") from e
    except TaskError as wrapped:
        assert describe_machine_failure(wrapped) == "a batch failed on 3 devices"
    # an actor whose constructor raised reaches the driver as text only
    text = RuntimeError("ray::MapWorker failed:\n  anogan_batch.errors.MachineError: node x ...")
    assert describe_machine_failure(text) == "node x ..."
    assert describe_machine_failure(RuntimeError("a bug")) is None


def test_a_search_holds_what_the_free_memory_fits():
    gib = 2**30
    assert devices.rows_that_fit(40 * gib, 8 * 2**20) == int(40 * gib * devices.MEMORY_SHARE) // (
        8 * 2**20
    )
    assert devices.rows_that_fit(10 * 2**20, 2**30) == 1  # never less than one patch
    assert devices.rows_that_fit(4 * gib, 2**20, share=0.5) == 2048
    with pytest.raises(ValueError):
        devices.rows_that_fit(gib, 0)


def test_the_cpu_gets_no_gpu_settings():
    assert devices.configure("cpu") == {}
    assert set(devices.CUDA_SETTINGS) == {"cudnn_tf32", "matmul_tf32", "cudnn_benchmark"}
