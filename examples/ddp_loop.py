"""Any mtlkit method in your own DistributedDataParallel loop (no Trainer).

    torchrun --nproc-per-node 2 examples/ddp_loop.py

Each rank trains on its shard of every global batch of 64; the method sees the global losses, its
solve the global per-task gradients, and every rank ends with the weights one process would reach
on the whole batches. Loss weightings may run with DDP's reducer on; every other method runs the
forward and its backward inside ``model.no_sync()`` and averages the gradients itself.
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import mtlkit as mk
from mtlkit.train.distributed import finish, init_from_env, shard_loader, wrap

run = init_from_env("cpu")
torch.manual_seed(0)
data = mk.data.load("mmoe_synthetic", n_train=512, n_val=64, n_test=64)
model: DistributedDataParallel = wrap(
    mk.models.MMoE(data.in_features, data.tasks, num_experts=2, expert_dims=[8], tower_dims=[4]), run
)
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
driver = mk.methods.Driver(mk.methods.create("upgrad"), model, optimizer, data.tasks)
loader = shard_loader(data.train, 64, run)
for _ in range(2):
    with driver.epoch():
        for batch in loader:
            optimizer.zero_grad()
            with model.no_sync():  # UPGrad averages the gradients itself
                out = model(batch.inputs, full_output=True)
                info = driver.backward(data.tasks.losses(out.predictions, batch.targets), out)
            optimizer.step()
weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
every = [torch.empty_like(weights) for _ in range(run.world_size)]
dist.all_gather(every, weights)
if run.is_main:
    same = all(torch.equal(every[0], w) for w in every)
    print(f"{run.world_size} ranks, the same weights on every rank: {same}; last losses {info.scalars()}")
finish()
