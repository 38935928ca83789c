"""DistributedDataParallel on CPU: 2 gloo processes vs 1 process with the same global batch.

Why the results match only within a tolerance: the two runs see exactly the
same samples in every iteration (the sample stream is a function of the seed
and the sample number, and rank r takes the r-th half of each global batch),
and DDP averages the two half-batch gradients, which equals the full-batch
mean of the L1 loss. What differs is the order of floating-point sums (two
means of 2 samples averaged vs one mean of 4, plus gloo's all-reduce), i.e.
relative differences of a few float32 ulps (~1e-7) in each gradient. Adam
normalises each update by the gradient's running RMS, so such relative changes
stay of the same relative size in the updates unless a gradient is ~0. So we
require the total weight change of the DDP run to equal the single-process one
to 1e-4 relative (L2 over all weights): ~1000x the rounding level, while any
real difference in the data (checked below: the same run with another seed)
changes it by > 10%. Measured: 2.5e-7.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from train_helpers import make_paired, tiny_config

from distillsr.checkpoint import read_state_dict
from distillsr.engine import load_config, train
from distillsr.registry import create_model

TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, overrides):
    import train_helpers  # noqa: F401  (registers the tiny network in the child)
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(load_config(None, overrides), log=lambda m: None)


def _delta(run_dir, init):
    sd, _ = read_state_dict(run_dir / "checkpoints" / "iter_00000006.safetensors")
    return torch.cat([(sd[k] - init[k]).flatten() for k in sorted(init)])


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    data = make_paired(tmp_path / "data", n=4, size=48, scale=2)[0].parent
    common = {"train.iters": 6, "train.ckpt_every": 6, "train.ema_decay": 0, "data.batch_size": 4,
              "optim.lr": 1e-3, "train.log_every": 3}
    torch.manual_seed(3)
    from train_helpers import TINY
    init = {k: v.clone() for k, v in create_model(TINY, 2).state_dict().items()}  # seed 3 = the runs' init

    single = train(load_config(None, tiny_config(tmp_path, data, name="single", **common)), log=lambda m: None)
    ddp_over = tiny_config(tmp_path, data, name="ddp", **common)
    mp.spawn(_worker, args=(2, _free_port(), ddp_over), nprocs=2, join=True)
    ddp_dir = tmp_path / "runs" / "ddp"
    assert (ddp_dir / "model.safetensors").is_file()
    # only rank 0 wrote: one log, one set of checkpoints
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == \
        ["iter_00000006.safetensors", "iter_00000006.state.pt"]

    d1, d2 = _delta(single.run_dir, init), _delta(ddp_dir, init)
    rel = float((d1 - d2).norm() / d1.norm())
    assert rel < TOL, rel

    # negative control: other samples (another seed) change the weights far beyond the tolerance
    other = train(load_config(None, tiny_config(tmp_path, data, name="other", seed=4, **common)),
                  log=lambda m: None)
    torch.manual_seed(4)
    init4 = {k: v.clone() for k, v in create_model(TINY, 2).state_dict().items()}
    d3 = _delta(other.run_dir, init4)
    assert float((d1 - d3).norm() / d1.norm()) > 0.1

    # the DDP state file records both ranks' RNG states and resumes on one process
    state = torch.load(ddp_dir / "checkpoints" / "iter_00000006.state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
