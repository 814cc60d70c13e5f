"""Seconds of each stage of ``napari-qsm demo`` (the table ``napari_qsm.demo.EXPECTED_SECONDS`` is made from it).

    python benchmarks/bench_demo.py [--full]

Prints, per stage (phantom, each method, figure), the wall seconds and the process CPU seconds
(all threads), with the load average before and after: on a loaded machine the wall seconds grow,
the CPU seconds much less. Copy the wall seconds of an idle run into ``EXPECTED_SECONDS``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def main(full: bool = False) -> dict:
    from napari_qsm import demo

    stages: dict = {}
    load0 = os.getloadavg()
    real_phantom, real_png = demo._phantom, demo._comparison_png

    def timed(name, fn):
        def wrapper(*a, **k):
            w, c = time.perf_counter(), time.process_time()
            out = fn(*a, **k)
            stages[name] = {"wall": round(time.perf_counter() - w, 1), "cpu": round(time.process_time() - c, 1)}
            return out
        return wrapper

    demo._phantom = timed("phantom", real_phantom)
    demo._comparison_png = timed("figure", real_png)
    c0, w0 = time.process_time(), time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as d:
            out = demo.run_demo(d, quiet=True, full=full)
    finally:
        demo._phantom, demo._comparison_png = real_phantom, real_png
    for r in out["rows"]:
        key = next((k for k, v in out["results"].items() if k == r["method"]), r["method"])
        res = out["results"].get(key)
        if res is not None:
            stages[res.method + ("_full" if full and res.method == "dsbn_adapt" else "")] = {"wall": round(res.seconds, 1)}
    return {"stages": stages, "wall": round(time.perf_counter() - w0, 1), "cpu": round(time.process_time() - c0, 1),
            "load_before": [round(x, 1) for x in load0], "load_after": [round(x, 1) for x in os.getloadavg()],
            "cpus": os.cpu_count()}


if __name__ == "__main__":
    print(json.dumps(main("--full" in sys.argv), indent=1))
