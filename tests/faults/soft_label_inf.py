"""Knowledge distillation with soft labels stored as log-probabilities and exponentiated at load
time: one stored row overflowed to +inf, so its soft label holds inf. The student's input is finite;
the inf enters the step through the label."""

import torch
import torch.nn.functional as F
from torch import nn

EXPECTED = {"phase": "data", "module": None, "op": None, "kind": "inf", "tensor": "label"}
VERDICT = {"id": "bad_data", "cause": "the label", "fix": "torch.isfinite"}


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 5))

    def forward(self, x):
        return self.net(x)


torch.manual_seed(0)
inputs = torch.randn(40, 12)
teacher_logprobs = torch.log_softmax(torch.randn(40, 5) * 2, dim=-1)
teacher_logprobs[27, 1] = 100.0  # a corrupted row in the cached teacher outputs
soft_labels = teacher_logprobs.exp()  # exp(100) overflows float32: +inf

model = Student()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for step in range(5):
    x, p = inputs[step * 8 : step * 8 + 8], soft_labels[step * 8 : step * 8 + 8]
    loss = F.cross_entropy(model(x), p)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
