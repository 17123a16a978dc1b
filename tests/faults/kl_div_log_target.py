"""Knowledge distillation with ``F.kl_div(student_log_probs, teacher_log_probs)``: the teacher's
log-probabilities are passed as the target without ``log_target=True``, so kl_div reads them as
probabilities and computes ``t · log t`` of negative numbers — NaN at the first step. Clamping
anything does not help; telling kl_div what its target is does."""

import torch
import torch.nn.functional as F
from torch import nn

EXPECTED = {"phase": "loss", "op": "kl_div", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "target holds negative values", "fix": "log_target=True"}

torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).eval()
model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
temperature = 2.0
for step in range(8):
    x = torch.randn(64, 20)
    with torch.no_grad():
        soft_targets = F.log_softmax(teacher(x) / temperature, dim=-1)
    log_probs = F.log_softmax(model(x) / temperature, dim=-1)
    loss = F.kl_div(log_probs, soft_targets, reduction="batchmean") * temperature**2
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
