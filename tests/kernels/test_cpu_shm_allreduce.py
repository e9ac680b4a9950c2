"""The shared-memory all-reduce of CPU tensor-parallel ranks (kernels/cpu_shm_allreduce.c),
between real processes: sums equal torch's float32 sum in rank order (bit for bit, on every
rank), tensors larger than a slot go in pieces, reused banks never mix calls, and a wait
ends with an error when the group is aborted or a peer is reported dead."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenfleet.kernels import cpu_shm_allreduce

SHAPES = [(1, 576), (7, 129), (300, 64)]  # the last one: 19,200 elements, many small slots


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> cpu_shm_allreduce.CpuShmAllReduce:
    built = cpu_shm_allreduce.load(tmp_path_factory.mktemp("kernels"))
    if built is None:
        pytest.skip("no C compiler")
    return built


def _inputs(rank: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(shape, generator=g) * 3).to(dtype) for shape in SHAPES for _ in (0, 1)]


def _rank(library: str, path: str, rank: int, size: int, dtype_name: str,
          out: Any) -> None:
    lib = cpu_shm_allreduce.CpuShmAllReduce(Path(library))
    group = lib.group(Path(path), rank, size, create=False, slot_bytes=4096)
    results = []
    for t in _inputs(rank, getattr(torch, dtype_name)):
        group.all_reduce(t, lambda: None)
        results.append(t.view(torch.uint8).numpy().tobytes())  # bytes: exact, no fd sharing
    out.put((rank, results))
    group.close()


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_rank_gets_the_sum_in_rank_order(lib: Any, tmp_path: Path, size: int,
                                              dtype: torch.dtype) -> None:
    path = tmp_path / "group"
    owner = lib.group(path, 0, size, create=True, slot_bytes=4096)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(str(lib.library), str(path), r, size,
                                             str(dtype).split(".")[1], out))
             for r in range(1, size)]
    for p in procs:
        p.start()
    mine = _inputs(0, dtype)
    for t in mine:
        owner.all_reduce(t, lambda: None)
    got = {0: mine}
    for _ in procs:
        rank, raw = out.get(timeout=60)
        got[rank] = [torch.frombuffer(bytearray(b), dtype=dtype).view(t.shape)
                     for b, t in zip(raw, mine, strict=True)]
    for p in procs:
        p.join(timeout=30)
    owner.close(unlink=True)
    parts = [_inputs(r, dtype) for r in range(size)]
    for i, _ in enumerate(mine):
        expected = parts[0][i].float()
        for r in range(1, size):
            expected = expected + parts[r][i].float()
        for r in range(size):
            assert torch.equal(got[r][i], expected.to(dtype)), (r, i)


def test_an_abort_ends_the_wait(lib: Any, tmp_path: Path) -> None:
    group = lib.group(tmp_path / "g", 0, 2, create=True)
    group.abort()  # as a closing engine does; rank 1 never publishes
    with pytest.raises(RuntimeError, match="aborted"):
        group.all_reduce(torch.ones(4), lambda: None)
    group.close(unlink=True)


def test_a_long_wait_asks_whether_the_peers_live(lib: Any, tmp_path: Path) -> None:
    group = lib.group(tmp_path / "g", 0, 2, create=True)
    calls = []

    def is_alive() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("rank 1 is dead")

    with pytest.raises(RuntimeError, match="rank 1 is dead"):
        group.all_reduce(torch.ones(4, dtype=torch.bfloat16), is_alive)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="contiguous float32/bf16"):
        group.all_reduce(torch.ones(4, dtype=torch.float16), is_alive)
    group.close(unlink=True)
