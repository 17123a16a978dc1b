"""No trace on the user's objects: under ``gradguard run`` (and a Guard's own capture), what the script
saves is byte for byte what it saves without gradguard, loads where gradguard cannot be imported, and
nothing of gradguard — hook, mode, wrapper — reaches a loaded object, a DataLoader worker or the
process after the run."""

from __future__ import annotations

import copy
import io
import os
import pickle
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from gradguard.integrations.zerocode import ZeroCode
from gradguard.locate import StepCapture, keep_out_of_pickles

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

SAVES = textwrap.dedent(
    """
    import copy, pickle
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    for step in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()
        ema = copy.deepcopy(model)  # an EMA / best-model copy, taken mid-training
    torch.save(model, "model.pt")
    torch.save(model.state_dict(), "state.pt")
    torch.save(opt, "opt.pt")
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "ema": ema}, "ckpt.pt")
    with open("model.pkl", "wb") as f:
        pickle.dump(model, f)
    out = model(x)
    loss = out.logsumexp(1).mean()  # the loss-code window is open while the next save runs
    torch.save(model, "mid_step.pt")
    loss.backward()
    reloaded = torch.load("model.pt", weights_only=False)
    hooks = [h for m in reloaded.modules() for h in (*m._forward_hooks, *m._forward_pre_hooks)]
    print("loaded hooks", len(hooks), "ema hooks", sum(len(m._forward_pre_hooks) for m in ema.modules()))
    print(f"loss {loss.item():.6f}")
    """
)

BLOCKED_LOAD = textwrap.dedent(
    """
    import sys

    class NoGradguard:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "gradguard":
                raise ImportError("gradguard is blocked here")
            return None

    sys.meta_path.insert(0, NoGradguard())
    import pickle
    import torch
    from torch import nn

    class Net(nn.Module):  # the class the files pickle as __main__.Net
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            return self.body(x)

    for path in sys.argv[1:]:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                pickle.load(f)
        else:
            torch.load(path, weights_only=False)
    print("ok")
    """
)


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


def test_what_a_script_saves_under_run_is_what_it_saves_plain(tmp_path: Path) -> None:
    plain, guarded = tmp_path / "plain", tmp_path / "guarded"
    for d in (plain, guarded):
        d.mkdir()
        (d / "saves.py").write_text(SAVES)
    ref = _python("saves.py", cwd=plain)
    got = _python(
        "-m", "gradguard", "run", "--out", str(tmp_path / "run"), "--no-report", "saves.py", cwd=guarded
    )
    assert ref.returncode == 0 and got.returncode == 0, got.stderr
    assert got.stdout == ref.stdout and "loaded hooks 0 ema hooks 0" in got.stdout
    names = ["model.pt", "state.pt", "opt.pt", "ckpt.pt", "model.pkl", "mid_step.pt"]
    for name in names:
        assert b"gradguard" not in (guarded / name).read_bytes(), name
        if name.endswith(".pt"):  # a plain pickle of tensors names their storages by address
            assert (guarded / name).read_bytes() == (plain / name).read_bytes(), name
    loaded = _python("-c", BLOCKED_LOAD, *names, cwd=guarded)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "ok", loaded.stderr


def test_a_guards_capture_hooks_are_kept_out_of_pickles_and_copies() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    before, before_torch = pickle.dumps(model), _torch_bytes(model)
    kept_before = ours_in_copyreg()  # a guard another test left open keeps its classes' entries
    capture = StepCapture(model)  # what a Guard puts on its model (hooks=True)
    assert model._forward_pre_hooks and model._forward_hooks
    assert pickle.dumps(model) == before and _torch_bytes(model) == before_torch
    twin = copy.deepcopy(model)
    assert not twin._forward_pre_hooks and not twin._forward_hooks
    model(torch.randn(2, 3))
    assert capture.inputs is not None  # the hooks still work on the model itself
    capture.remove()
    assert pickle.dumps(model) == before
    assert ours_in_copyreg() == kept_before  # the capture's own entries are gone with it


def test_keeping_out_is_counted_and_leaves_a_users_own_reducer_alone() -> None:
    class Own(nn.Linear):
        pass

    def reducer(m: nn.Module) -> object:
        return (nn.Identity, ())

    table = copyreg_table()
    table[Own] = reducer
    try:
        handle = keep_out_of_pickles(Own)
        assert table[Own] is reducer
        handle.remove()
        assert table[Own] is reducer
    finally:
        del table[Own]
    first, second = keep_out_of_pickles(nn.GRU), keep_out_of_pickles(nn.GRU)
    first.remove()
    assert nn.GRU in table
    second.remove()
    second.remove()  # twice: harmless
    assert nn.GRU not in table


def ours_in_copyreg() -> set:
    """The classes that gradguard's reducer keeps out of pickles right now."""
    return {k for k, v in copyreg_table().items() if "gradguard" in getattr(v, "__module__", "")}


def copyreg_table() -> dict:
    import copyreg

    return copyreg.dispatch_table


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


FORKS = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    def state():
        from torch.nn.modules import module

        return (
            len(module._global_forward_pre_hooks) + len(module._global_forward_hooks),
            torch._C._len_torch_function_stack(),
            torch.autograd.backward.__module__,
            torch.nn.utils.clip_grad_norm_.__module__,
            torch.amp.GradScaler.step.__module__,
        )

    class Probe(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.tensor(float(i)), repr(state())

    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        loss = model(torch.randn(4, 2)).pow(2).mean()
        seen = [s for _, s in DataLoader(Probe(), batch_size=1, num_workers=2)]  # forked in the loss code
        loss.backward()
        opt.step()
    print("worker", seen[0][0])
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="DataLoader workers are forked on Linux only")
def test_nothing_reaches_a_forked_dataloader_worker(tmp_path: Path) -> None:
    (tmp_path / "forks.py").write_text(FORKS)
    ref = _python("forks.py", cwd=tmp_path)
    got = _python(
        "-m", "gradguard", "run", "--out", str(tmp_path / "run"), "--no-report", "forks.py", cwd=tmp_path
    )
    assert ref.returncode == 0 and got.returncode == 0, got.stderr
    assert got.stdout == ref.stdout  # no global hook, no mode, torch's own functions in the worker
    assert "(0, 0, 'torch.autograd'" in ref.stdout


def test_after_the_run_torch_is_as_it_was(tmp_path: Path) -> None:
    from torch.amp.grad_scaler import GradScaler
    from torch.nn.modules import module as torch_module
    from torch.nn.utils import clip_grad

    originals = (
        torch.autograd.backward,
        torch.nn.utils.clip_grad_norm_,
        clip_grad.clip_grad_norm_,
        clip_grad._clip_grads_with_norm_,
        torch.nn.utils.clip_grad_value_,
        GradScaler.step,
        GradScaler.scale,
    )
    kept_before = ours_in_copyreg()  # a guard another test left open keeps its classes' entries
    script = tmp_path / "s.py"
    script.write_text(SAVES.replace('"', "'").replace("'model.pt'", "'m.pt'"))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with ZeroCode(out=tmp_path / "run", live=False):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        os.chdir(cwd)
    now = (
        torch.autograd.backward,
        torch.nn.utils.clip_grad_norm_,
        clip_grad.clip_grad_norm_,
        clip_grad._clip_grads_with_norm_,
        torch.nn.utils.clip_grad_value_,
        GradScaler.step,
        GradScaler.scale,
    )
    assert all(a is b for a, b in zip(originals, now))
    assert not torch_module._global_forward_pre_hooks and not torch_module._global_forward_hooks
    assert torch._C._len_torch_function_stack() == 0
    assert ours_in_copyreg() == kept_before
