#!/usr/bin/env python3
"""One measurement row: sample a model with the C engine, score it with the judge, count its cost.

    nice -n 10 /usr/bin/python3 tools/moe_lab/measure.py --model assets/ditmoe-fmnist.safetensors \
        --tag "bf16" --n 100 -- --precision bf16

runs `ditmoe-sample --model M --class all -n N --seed 2024 --batch 25 --threads 1 -v
--dump-routing W/r.dmr -o W/img_%04d.png EXTRA...` (the model card's protocol: 50 Euler steps and
CFG 2.0 from the file), renames the PNGs to c<class>_<i>.png, scores them with
tools/eval/eval_samples.py's evaluate() (judge accuracy, Frechet distance of the judge's features
vs a balanced test subset A, real-vs-real FD of test subsets A and B at the same N), counts the
active transformer MACs per image from the routing dump (tools/moe_lab/dmr.py), and appends one
JSON line to --out:

  tag, model, flags, n_per_class, seed, accuracy, acc_binomial_std, per_class_accuracy,
  fd, fd_real, wall_s_per_image, cpu_s_per_image (user+sys of the child), transformer_s_per_image
  (the engine's -v line), weights_mib (the engine's "MiB of weights on backend" line), peak_rss_mib,
  macs_per_image (routed + dense), routed_macs_per_image, picks_per_token_layer, loadavg [before,
  after] (the machine is shared: read wall times with it).

Images and the dump are deleted afterwards unless --keep. Everything stays under --work.
"""
import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tools", "eval"))


def run_engine(a, extra, work):
    exe = os.path.join(a.bin, "ditmoe-sample")
    cmd = [exe, "--model", a.model, "--class", "all", "-n", str(a.n), "--seed", str(a.seed),
           "--batch", str(a.batch), "--threads", str(a.threads), "-v",
           "-o", os.path.join(work, "img_%04d.png")]
    if not a.no_dump:
        cmd += ["--dump-routing", os.path.join(work, "r.dmr")]
    cmd += extra
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:])
        raise SystemExit(f"measure: {' '.join(cmd)} exited {p.returncode}")
    log = p.stdout
    m = re.search(r"([\d.]+) MiB of weights", log)
    tr = re.search(r"transformer: ([\d.]+) s", log)
    return dict(cmd=" ".join(cmd), wall=wall,
                cpu=(r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
                rss_mib=r1.ru_maxrss / 1024.0,
                weights_mib=float(m.group(1)) if m else None,
                transformer_s=float(tr.group(1)) if tr else None,
                info=[l for l in log.splitlines() if "precision" in l or "route" in l.lower()
                      or "cache" in l.lower()][:6],
                loadavg=[load0, os.getloadavg()[0]])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "assets", "ditmoe-fmnist.safetensors"))
    p.add_argument("--tag", default="")
    p.add_argument("--n", type=int, default=100, help="images per class")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bin", default=os.path.join(ROOT, "build", "bin"))
    p.add_argument("--judge", default=os.path.join(ROOT, "runs", "classifier"),
                   help="classifier run directory (classifier.pt), tools/eval/classifier.py --run")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "measure"))
    p.add_argument("--out", default=None, help="results JSONL (default: WORK/results.jsonl)")
    p.add_argument("--no-dump", action="store_true", help="no routing dump (no MAC count)")
    p.add_argument("--keep", action="store_true", help="keep the images and the dump")
    a = p.parse_args(argv)
    out = a.out or os.path.join(a.work, "results.jsonl")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{os.path.basename(a.model)}_{a.tag or 'run'}_{a.seed}")
    work = os.path.join(a.work, "w_" + slug)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    eng = run_engine(a, extra, work)
    n_img = 10 * a.n
    for i in range(n_img):          # --class all: image i is class i // n
        os.replace(os.path.join(work, f"img_{i:04d}.png"),
                   os.path.join(work, f"c{i // a.n}_{i:04d}.png"))

    import numpy as np
    import eval_samples
    from classifier import load_classifier
    judge_pt = os.path.join(a.judge, "classifier.pt")
    while not os.path.exists(judge_pt):      # the judge may still be training (classifier.py)
        time.sleep(20)
    imgs, labels = eval_samples.read_png_dir(work)
    assert len(labels) == n_img and int(np.bincount(labels, minlength=10).min()) == a.n
    ev = eval_samples.evaluate(imgs, labels, a.n, load_classifier(a.judge), print)

    res = dict(tag=a.tag, model=os.path.basename(a.model), flags=" ".join(extra), n_per_class=a.n,
               seed=a.seed, batch=a.batch, threads=a.threads,
               accuracy=ev["accuracy"],
               acc_binomial_std=math.sqrt(ev["accuracy"] * (1 - ev["accuracy"]) / n_img),
               per_class_accuracy=[round(x, 3) for x in ev["per_class_accuracy"]],
               fd=ev["fd_gen_vs_testA"], fd_real=ev["fd_testB_vs_testA"],
               judge_test_accuracy=ev["judge_test_accuracy"],
               wall_s_per_image=eng["wall"] / n_img, cpu_s_per_image=eng["cpu"] / n_img,
               transformer_s_per_image=(eng["transformer_s"] / n_img
                                        if eng["transformer_s"] is not None else None),
               weights_mib=eng["weights_mib"], peak_rss_mib=eng["rss_mib"],
               loadavg=eng["loadavg"], engine_info=eng["info"], cmd=eng["cmd"],
               when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if not a.no_dump:
        import dmr
        res.update(dmr.count_macs(os.path.join(work, "r.dmr"), a.model))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")
    short = {k: res[k] for k in ("tag", "model", "flags", "accuracy", "fd", "fd_real",
                                 "wall_s_per_image", "cpu_s_per_image", "weights_mib")}
    short["gmac_per_image"] = res.get("macs_per_image", float("nan")) / 1e9
    print(json.dumps(short))
    return 0


if __name__ == "__main__":
    sys.exit(main())
