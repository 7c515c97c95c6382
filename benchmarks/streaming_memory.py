"""Peak memory of a streamed capture (``capture_to_disk``) against an in-memory ``capture``.

Each (mode, N) runs in a fresh Python process: the model is loaded and one batch captured
(warm-up), the peak resident set size is reset (``/proc/self/clear_refs``), then the N
images are captured; the figure is the peak RSS (VmHWM) minus the RSS at the reset.

    python benchmarks/streaming_memory.py --model tiny --sizes 100,1000 --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from pathlib import Path
from esmc_lens.models.vlm import load_model
from esmc_lens.apps.bench import PeakMemory, make_images
from esmc_lens.residual.capture import capture
from esmc_lens.residual.distributed import capture_to_disk
vlm = load_model(spec["model"])
paths = make_images(spec["images_dir"], spec["n"], spec["image_size"])
opts = dict(keywords=["red", "green", "blue"], top_k=5, batch_size=spec["batch_size"])
capture(vlm, paths[: spec["batch_size"]], spec["prompt"], progress=False, **opts)  # warm-up
mem = PeakMemory(vlm.device)
mem.reset()
t = time.perf_counter()
if spec["mode"] == "stream":
    out = capture_to_disk(vlm, paths, spec["prompt"], spec["store"], progress=False, **opts)
    disk = sum(f.stat().st_size for f in Path(out["dir"]).rglob("*") if f.is_file())
else:
    cache = capture(vlm, paths, spec["prompt"], progress=False, **opts)
    disk = None
seconds = time.perf_counter() - t
print(json.dumps({**mem.read(), "seconds": seconds, "disk_bytes": disk}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--sizes", default="100,1000")
    p.add_argument("--modes", default="stream,memory")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", default="The color of the object is")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="esmc-stream-") as tmp:
        for n in [int(s) for s in args.sizes.split(",")]:
            for mode in args.modes.split(","):
                spec = {"model": args.model, "n": n, "mode": mode, "prompt": args.prompt,
                        "batch_size": args.batch_size, "image_size": args.image_size,
                        "threads": args.threads, "images_dir": tmp,
                        "store": f"{tmp}/store-{mode}-{n}"}
                proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    return 1
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append({"model": args.model, "mode": mode, "n_images": n, **res})
                if not args.json:
                    print(f"{mode:6s} N={n:5d}  peak RSS +{res['peak_rss_delta_mb']:7.1f} MB "
                          f"(absolute {res['peak_rss_mb']:.0f} MB)  {res['seconds']:.1f} s"
                          + (f"  disk {res['disk_bytes'] / 2**20:.1f} MB"
                             if res["disk_bytes"] else ""), flush=True)
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": rows},
                         indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
