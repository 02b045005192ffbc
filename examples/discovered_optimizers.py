"""Use the paper's discovered rules as ordinary torch optimizers.

Trains one small MLP on a fixed synthetic regression problem with Adam, PowerSign,
AddSign (cosine sign decay) and two Table 1 rules, and prints the final losses.

    python examples/discovered_optimizers.py
"""

import torch

from nos_gym.optim import AddSign, NOSOptimizer, PowerSign, table1

STEPS = 300
torch.manual_seed(0)
X = torch.randn(512, 20)
Y = torch.tanh(X @ torch.randn(20, 1))


def train(make_optimizer) -> float:
    torch.manual_seed(1)  # same initial weights for every optimizer
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = make_optimizer(model.parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
    return loss.item()


candidates = {
    "Adam (torch)": lambda p: torch.optim.Adam(p, lr=1e-2),
    "PowerSign": lambda p: PowerSign(p, lr=0.1),
    "AddSign, cosine decay": lambda p: AddSign(p, lr=0.1, sign_decay="cosine", decay_steps=STEPS),
    f"optimizer_1: {table1()['optimizer_1']}": lambda p: NOSOptimizer(p, rule="optimizer_1", lr=0.1),
    "your own rule: ADAM * exp(sign(g) * sign(m))": lambda p: NOSOptimizer(p, rule="ADAM * exp(sign(g) * sign(m))", lr=1e-2),
}
print(f"final training loss after {STEPS} full-batch steps (lr 1e-2 for Adam-like rules, 0.1 for g-scaled ones)")
for name, make in candidates.items():
    print(f"  {train(make):.5f}  {name}")
