import subprocess
import sys

import gradguard


def test_public_api_names():
    assert "clip_grad_norm_" in gradguard.__all__
    for name in gradguard.__all__:
        assert hasattr(gradguard, name)


def test_python_m_gradguard_runs():
    out = subprocess.run(
        [sys.executable, "-m", "gradguard", "--help"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "demo" in out.stdout
