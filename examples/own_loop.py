"""Your own training loop (here Adam with a learning-rate schedule) as participant 0 of a run.

    dssgd aggregator --run-id loop1 --task examples/no_test_set.py:TASK --participants 1 \
        --epochs 0 &  python examples/own_loop.py loop1

pull() loads the global state into the module, you train it your way, push() shares the change:
dssgd computes Δw against what was pulled, selects θu, clips to ±γ, encodes and publishes it,
confirmed and applied exactly once.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a fresh clone, not installed

from shared.tasks import TaskContext, as_tensors, load_task
from worker.client import Client


def main(run_id: str, rounds: int = 10) -> None:
    task = load_task("examples/no_test_set.py:TASK")
    model = task.build_model()
    x, y = as_tensors(task.local_data(TaskContext(0, 1, 1)))
    client = Client(run_id, participant=0, model=model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    for r in range(rounds):
        version = client.pull(model)
        for _ in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
        report = client.push(model, float(loss.detach()))
        print(f"round {r}: from version {version}, loss {float(loss):.4f}, {report.bytes_up} B up")
    client.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "loop1")
