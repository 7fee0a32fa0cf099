"""gpu_check's first step: what the machine has (GPU, driver, versions), and whether it can run the check."""
from __future__ import annotations

import os
import subprocess
import sys

NO_DALI = ("NVIDIA DALI is not installed for {python}: without network, fetch the wheels elsewhere "
           "(`pip download nvidia-dali-cuda130==2.4.0` and its nvidia-* dependencies) and install them here "
           "with `pip install --no-index --find-links WHEELS nvidia-dali-cuda130`, or unpack an offline "
           "bundle (`bash PARTS/unpack.sh PARTS /tmp/site && source /tmp/site/env.sh`), then run this again")
NO_GPU = ("no CUDA GPU is visible to torch {torch}: on a machine without one, run "
          "`bash scripts/gpu_check.sh --dry-run`")


def environment(plan) -> dict:
    """GPU, driver and versions; SystemExit(2) with one sentence when the machine cannot run the check
    (`plan`: gpu_check's Plan, whose device says whether a GPU is needed)."""
    import importlib.metadata
    import importlib.util
    import platform

    import torch

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    from simclr_dali.tools.benchmark.common import hardware_info

    info = {"python": platform.python_version(), "executable": sys.executable, "cpu_cores": os.cpu_count(),
            "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "triton": version("triton"),
            "timm": version("timm"), "accelerate": version("accelerate"), "dali": dali_version(),
            "hardware": hardware_info()}
    if info["dali"] is None:
        raise SystemExit(NO_DALI.format(python=sys.executable))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                    driver=_nvidia_smi("driver_version"))
    elif plan.device == "cuda":
        raise SystemExit(NO_GPU.format(torch=torch.__version__))
    return info


def dali_version() -> str | None:
    """DALI's version, or None when it cannot be imported (also from an unpacked bundle on PYTHONPATH)."""
    try:
        import nvidia.dali
    except ImportError:
        return None
    return nvidia.dali.__version__


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
