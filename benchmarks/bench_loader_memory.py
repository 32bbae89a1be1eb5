"""Peak memory of building a DMD2 UNet model from a file: ComfyUI's copy path
(allocate the UNet, load_state_dict copies) vs the loader's assign path (meta UNet takes the
file's tensors). Real SD1.5 UNet shapes, fp16 file, fp16 or fp32 model. Each measurement in a
fresh process; figures are ru_maxrss above the process's RSS before the build."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = r"""
import os, sys, json, time, resource, types
sys.path.insert(0, sys.argv[4])
from comfyui_dmd2.comfy_env import ensure_comfy; ensure_comfy(cpu=True)
import torch, tiny_releases, comfy.model_patcher
from comfyui_dmd2.nodes import loaders
path, mode, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
cfg = tiny_releases.REAL_MODEL_CONFIG_CLASSES["sd15"](dict(tiny_releases.REAL_UNET_CONFIGS["sd15"]))
cfg.set_inference_dtype(dtype, None)
base = comfy.model_patcher.ModelPatcher(cfg.get_model({}, "", device=torch.device("meta")), torch.device("cpu"), torch.device("cpu"))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
t = time.perf_counter()
sd = loaders.read_state_dict(path)
ldm = loaders.to_comfy_unet_state_dict(sd, loaders.TargetUNet.from_model(base)); del sd
if mode == "copy":
    import copy
    c = copy.copy(cfg); c.unet_config = dict(c.unet_config)
    m = c.get_model({}, ""); m.load_model_weights(ldm, "")
else:
    m = loaders.build_model_like(base, ldm).model
# touch every weight once (as sampling would)
s = sum(float(p.float().abs().sum()) for p in m.diffusion_model.parameters())
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"mode": mode, "dtype": str(dtype), "seconds": round(dt, 2), "rss_after_GB": round(rss() / 2**30, 2),
                  "peak_above_start_GB": round((peak - before) / 2**30, 2)}))
"""


def main():
    sys.path.insert(0, str(REPO / "tests"))
    path = Path(tempfile.gettempdir()) / "dmd2bench" / "sd15_real_shape_fp16.bin"
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        from comfyui_dmd2.comfy_env import ensure_comfy

        ensure_comfy(cpu=True)
        import torch
        import tiny_releases

        shapes = {
            k: v.shape
            for k, v in tiny_releases.diffusers_unet("sd15", real=True)
            .state_dict()
            .items()
        }
        g = torch.Generator().manual_seed(0)
        torch.save(
            {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()},
            path,
        )
    print(f"file: {path.name} {path.stat().st_size / 2**30:.2f} GiB")
    results = {}
    for dtype in ("float16", "float32"):
        for mode in ("copy", "assign"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(path),
                    mode,
                    dtype,
                    str(REPO / "tests"),
                ],
                capture_output=True,
                text=True,
            )
            line = [row for row in out.stdout.splitlines() if row.startswith("{")]
            if not line:
                print(out.stderr[-2000:])
                continue
            r = json.loads(line[-1])
            results[(dtype, mode)] = r
            print(r)
        c, a = results.get((dtype, "copy")), results.get((dtype, "assign"))
        if c and a:
            print(
                f"{dtype} model: peak assign/copy = {a['peak_above_start_GB'] / c['peak_above_start_GB']:.2f}, "
                f"time assign/copy = {a['seconds'] / c['seconds']:.2f}"
            )


if __name__ == "__main__":
    main()
