"""Meshes over several TPU slices and several hosts: which devices share a tensor / fsdp group.

TPU slices are libtpu's compile-only devices of a multi-slice topology (skipped without libtpu).
Hosts are stand-ins carrying the attributes a real device has and `device_grid` reads (platform,
device_kind, id, process_index and, for GPUs of a multi-process job, slice_index): one process per
GPU is a real launch style, and a single CPU process cannot hold devices of several processes.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import subprocess
import sys

import numpy as np
import pytest

from manager_jax.sharding import MeshConfig, ShardingError, device_grid, make_mesh
from manager_jax.train.aot import AotError, host_batch, libtpu_available, topology_devices

needs_libtpu = pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<this jax>')")


def groups(grid: np.ndarray, axis: str) -> list[list]:
    """The device groups along one mesh axis (every other axis fixed)."""
    a = ("data", "fsdp", "tensor").index(axis)
    return [list(row) for row in np.moveaxis(grid, a, -1).reshape(-1, grid.shape[a])]


def spans(group: list, attr: str) -> int:
    return len({getattr(d, attr) for d in group})


@pytest.fixture(scope="module")
def two_slices():
    """2 slices of v5e:4x4: 32 chips, 8 hosts of 4."""
    return topology_devices("2xv5e:4x4")


@needs_libtpu
def test_the_multi_slice_topology_has_two_slices_of_four_hosts(two_slices):
    assert len(two_slices) == 32
    assert sorted({(d.slice_index, d.process_index) for d in two_slices}) == [
        (s, p) for s in range(2) for p in range(4 * s, 4 * s + 4)]


@needs_libtpu
def test_slices_go_to_data_first_then_fsdp_and_never_to_tensor(two_slices, caplog):
    # data=2: each data row is one whole slice; fsdp and tensor stay inside it.
    with caplog.at_level(logging.WARNING, logger="manager_jax.sharding"):
        grid = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=4), two_slices).devices
    assert "fsdp spans" not in caplog.text
    assert [spans(list(grid[i].flat), "slice_index") for i in range(2)] == [1, 1]
    assert {grid[i].flat[0].slice_index for i in range(2)} == {0, 1}
    assert all(spans(g, "slice_index") == 1 for g in groups(grid, "fsdp") + groups(grid, "tensor"))
    # The recipes' default mesh (fsdp over all): fsdp is the axis that crosses, tensor groups stay;
    # the log says how to keep FSDP's gathers off the slow links.
    with caplog.at_level(logging.WARNING, logger="manager_jax.sharding"):
        grid = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=2), two_slices).devices
    assert "fsdp spans 2 TPU slices" in caplog.text and "--set mesh.data=2" in caplog.text
    assert all(spans(g, "slice_index") == 2 for g in groups(grid, "fsdp"))
    assert all(spans(g, "slice_index") == 1 for g in groups(grid, "tensor"))
    # A tensor group may span the hosts of one slice (ICI links them), not two slices.
    grid = make_mesh(MeshConfig(data=1, fsdp=2, tensor=16), two_slices).devices
    assert all(spans(g, "slice_index") == 1 and spans(g, "process_index") == 4 for g in groups(grid, "tensor"))


@needs_libtpu
def test_each_slice_keeps_the_single_slice_torus_order(two_slices):
    """Within a slice the devices lie as on one slice alone (create_device_mesh's torus order), not
    in their listed order; the order they are listed in does not matter."""
    single = make_mesh(MeshConfig(data=1, fsdp=4, tensor=4), topology_devices("v5e:4x4")).devices
    want = sorted(sorted(tuple(d.coords) for d in g) for g in groups(single, "tensor"))
    shuffled = list(two_slices)
    random.Random(0).shuffle(shuffled)
    for devices in (two_slices, shuffled):
        grid = make_mesh(MeshConfig(data=2, fsdp=4, tensor=4), devices).devices
        for s in range(2):
            got = sorted(sorted(tuple(d.coords) for d in g) for g in groups(grid[s:s + 1], "tensor"))
            assert got == want
    listed = np.asarray(two_slices[:16], dtype=object).reshape(4, 4)  # what the old fallback used
    assert want != sorted(sorted(tuple(d.coords) for d in row) for row in listed)


@needs_libtpu
def test_a_tensor_axis_larger_than_a_slice_is_refused(two_slices, caplog):
    with pytest.raises(ShardingError, match=r"across slices \(2 slices of 16 devices.*tensor must divide 16"):
        make_mesh(MeshConfig(data=1, fsdp=1, tensor=32), two_slices)
    # A subset of the devices must take whole slices.
    with pytest.raises(ShardingError, match=r"unevenly on 2 slices \(\[4, 16\]"):
        make_mesh(MeshConfig(fsdp=-1, num_devices=20), two_slices)
    # 3 chips of a slice are no box of its torus: listed order, and the log says so.
    with caplog.at_level(logging.WARNING, logger="manager_jax.sharding"):
        part = make_mesh(MeshConfig(fsdp=-1, num_devices=3), two_slices)
    assert list(part.devices.flat) == two_slices[:3]
    assert "in their listed order, not along the physical links" in caplog.text


@needs_libtpu
def test_every_host_of_two_slices_feeds_an_equal_share(two_slices):
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2), two_slices)
    assert host_batch(mesh, shards=16, rows=1) == {"hosts": 8, "shards_per_host": 2, "rows_per_host": 2}


def test_bad_slice_counts_are_refused():
    with pytest.raises(AotError, match="at least 1"):
        topology_devices("0xv5e:4x4")


@dataclasses.dataclass(frozen=True)
class Device:
    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "NVIDIA H100 80GB HBM3"


@dataclasses.dataclass(frozen=True)
class NodeDevice(Device):
    slice_index: int = 0  # a multi-process GPU job's node (the processes of a host share it)


def test_gpu_processes_of_one_node_are_one_host():
    """2 nodes of 8 GPUs, one process per GPU, listed process by process with the nodes interleaved:
    tensor groups of 8 stay on a node, data rows are whole nodes."""
    devices = [NodeDevice(id=10 * p, process_index=p, slice_index=p % 2) for p in range(16)]
    grid = device_grid(MeshConfig(data=2, fsdp=1, tensor=8), devices)
    assert all(spans(g, "slice_index") == 1 for g in groups(grid, "tensor"))
    assert [grid[i, 0, 0].slice_index for i in range(2)] == [0, 1]
    with pytest.raises(ShardingError, match=r"across hosts \(2 hosts of 8 devices"):
        device_grid(MeshConfig(data=1, fsdp=1, tensor=16), devices)


def test_hosts_without_slice_index_are_their_processes(caplog):
    """One process per host (CPU, or GPUs started one process a node): a host is a process."""
    devices = [Device(id=i, process_index=i % 4, platform="cpu", device_kind="cpu") for i in range(16)]
    with caplog.at_level(logging.INFO, logger="manager_jax.sharding"):
        grid = device_grid(MeshConfig(data=2, fsdp=-1, tensor=4), devices)
    assert "over 4 hosts" in caplog.text
    assert all(spans(g, "process_index") == 1 for g in groups(grid, "tensor"))
    assert all(spans(g, "process_index") == 2 for g in groups(grid, "fsdp"))  # data took 2 of the 4
    assert sorted(spans(list(grid[i].flat), "process_index") for i in range(2)) == [2, 2]
    with pytest.raises(ShardingError, match="tensor must divide 4"):
        device_grid(MeshConfig(data=1, fsdp=2, tensor=8), devices)


def test_the_cli_refuses_a_tensor_axis_across_hosts_before_compiling():
    """cpu:8 is one host, so the refusal needs a multi-slice topology; without libtpu the same
    command is refused for the missing library. Either way: one line and exit status 2."""
    cmd = [sys.executable, "run.py", "compile", "--config", "configs/demo.py", "--topology", "2xv5e:4x4",
           "--set", "mesh.fsdp=1", "--set", "mesh.tensor=32"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in out.stderr
    assert ("tensor must divide 16" if libtpu_available() else "needs libtpu") in error[0]


@pytest.mark.slow  # one compile of the demo step for 32 chips, about 40 s on 2 CPU cores
@needs_libtpu
def test_the_demo_compiles_for_two_slices():
    cmd = [sys.executable, "run.py", "compile", "--config", "configs/demo.py", "--topology", "2xv5e:4x4",
           "--set", "mesh.data=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "{'data': 2, 'fsdp': 1, 'tensor': 1} across them" in out.stderr
    assert "32 x TPU v5 lite" in out.stdout and "'hosts': 8" in out.stdout
    assert "-> fits" in out.stdout
