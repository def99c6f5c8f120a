"""Router-bias hook under data parallelism: two gloo processes see different data but keep identical biases."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanoseek import build


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build("tiny")
    torch.manual_seed(100 + rank)  # different data per rank
    model(torch.randint(0, 512, (2, 16)))
    local = torch.stack([r.expert_load.clone() for r in model.routers()])
    global_load = model.expert_load(sync=True)
    model.update_router_bias(1e-3)
    out[rank] = (local, global_load, torch.stack([r.e_score_correction_bias for r in model.routers()]))
    dist.destroy_process_group()


def test_bias_update_all_reduces_expert_load():
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
        (l0, g0, b0), (l1, g1, b1) = out[0], out[1]
    assert not torch.equal(l0, l1)  # the ranks routed different tokens
    assert torch.equal(g0, l0 + l1) and torch.equal(g1, l0 + l1)
    assert torch.equal(b0, b1)  # replicas stay identical
