#!/usr/bin/env python3
"""Back-to-back wall / CPU time per image of several engine settings, interleaved.

    nice -n 10 /usr/bin/python3 tools/moe_lab/timeit.py --model assets/ditmoe-fmnist.safetensors \
        --reps 3 --n 10 --setting "f32=" --setting "bf16=--precision bf16" \
        --setting "cache2=--expert-cache 2" [--bin build/bin] [--out T.jsonl]

A setting whose flags contain --model uses that model instead (e.g. "pruned6=--model P.safetensors").

Each repetition runs every setting once, in the given order (so a load change hits all settings
alike): `ditmoe-sample --model M --class all -n N --seed 2024 --batch 25 --threads 1 -v -o
W/t_%04d.png FLAGS`. Reported per setting: median and min of the wall seconds per image (whole
process: load, transformer, VAE, PNG), CPU seconds (user+sys) per image, the engine's
"transformer: X s" per image, the load average around each run, and the speed-up of the median
wall and CPU time against the first setting. One JSON line per setting to --out, a Markdown table
to stdout.
"""
import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one(a, flags, work):
    model = [] if "--model" in flags else ["--model", a.model]     # a setting may name its own model
    cmd = [os.path.join(a.bin, "ditmoe-sample")] + model + ["--class", "all", "-n", str(a.n),
           "--seed", str(a.seed), "--batch", str(a.batch), "--threads", str(a.threads), "-v",
           "-o", os.path.join(work, "t_%04d.png")] + flags
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    l0 = os.getloadavg()[0]
    t0 = time.monotonic()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:])
        raise SystemExit(f"timeit: {' '.join(cmd)} exited {p.returncode}")
    tr = re.search(r"transformer: ([\d.]+) s", p.stdout)
    n_img = 10 * a.n
    return dict(wall=wall / n_img, cpu=((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) / n_img,
                tr=float(tr.group(1)) / n_img if tr else float("nan"), load=l0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "assets", "ditmoe-fmnist.safetensors"))
    p.add_argument("--setting", action="append", required=True, help="NAME=FLAGS (space separated)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n", type=int, default=10, help="images per class per run")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bin", default=os.path.join(ROOT, "build", "bin"))
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "measure", "timeit"))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    settings = []
    for s in a.setting:
        name, _, flags = s.partition("=")
        settings.append((name, flags.split()))
    os.makedirs(a.work, exist_ok=True)
    res = {name: [] for name, _ in settings}
    for _ in range(a.reps):
        for name, flags in settings:
            res[name].append(one(a, flags, a.work))
    shutil.rmtree(a.work, ignore_errors=True)
    base = None
    print(f"| setting ({os.path.basename(a.model)}) | wall s/img median (min) | CPU s/img median | "
          "transformer s/img | wall speed-up | CPU speed-up | load avg |")
    print("|---|---|---|---|---|---|---|")
    lines = []
    for name, flags in settings:
        rs = res[name]
        w = statistics.median(r["wall"] for r in rs)
        c = statistics.median(r["cpu"] for r in rs)
        t = statistics.median(r["tr"] for r in rs)
        if base is None:
            base = (w, c)
        row = dict(model=os.path.basename(a.model), setting=name, flags=" ".join(flags), reps=a.reps,
                   n_per_class=a.n, batch=a.batch, threads=a.threads, wall_s_per_image=w,
                   wall_min=min(r["wall"] for r in rs), cpu_s_per_image=c, transformer_s_per_image=t,
                   wall_speedup=base[0] / w, cpu_speedup=base[1] / c,
                   loadavg=[round(r["load"], 2) for r in rs],
                   when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        lines.append(row)
        print(f"| {name} | {w:.4f} ({row['wall_min']:.4f}) | {c:.4f} | {t:.4f} | {row['wall_speedup']:.2f}x | "
              f"{row['cpu_speedup']:.2f}x | {min(row['loadavg']):.1f}-{max(row['loadavg']):.1f} |")
    if a.out:
        with open(a.out, "a") as f:
            for row in lines:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
