"""Advantage actor-critic with two optimizers on one network: the critic's loss is backpropagated
first, then the actor's loss is built on the same forward. The actor standardises the returns of
the batch; in a batch where no episode earned any reward every return is 0, its standard deviation
is 0, and (0 - 0) / 0 is NaN. The loss code of the second optimizer holds the fault."""

import torch
import torch.nn.functional as F
from torch import nn

EXPECTED = {"phase": "loss", "module": None, "op": "div", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "division by zero", "fix": "clamp_min(eps)"}


class ActorCritic(nn.Module):
    def __init__(self, obs_dim=6, actions=3):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, 32), nn.Tanh())
        self.policy = nn.Linear(32, actions)
        self.value = nn.Linear(32, 1)

    def forward(self, obs):
        h = self.trunk(obs)
        return self.policy(h), self.value(h.detach()).squeeze(-1)


torch.manual_seed(0)
net = ActorCritic()
actor_opt = torch.optim.Adam([*net.trunk.parameters(), *net.policy.parameters()], lr=3e-4)
critic_opt = torch.optim.Adam(net.value.parameters(), lr=1e-3)
model = net
for update in range(4):  # the last batch earned no reward: the run ends on its NaN loss
    obs = torch.randn(16, 6)
    returns = (torch.rand(16) < 0.3).float() if update != 3 else torch.zeros(16)
    logits, values = net(obs)
    dist = torch.distributions.Categorical(logits=logits)
    actions = dist.sample()

    critic_loss = F.mse_loss(values, returns)
    critic_opt.zero_grad()
    critic_loss.backward()

    scaled = (returns - returns.mean()) / returns.std()
    advantage = scaled - values.detach()
    loss = -(dist.log_prob(actions) * advantage).mean() - 0.01 * dist.entropy().mean()
    actor_opt.zero_grad()
    loss.backward()
    actor_opt.step()
    critic_opt.step()
