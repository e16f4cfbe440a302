"""What `scenebreak batch` costs over running the same jobs one by one, and how its
throughput scales with workers, on the CPU with the tiny random model.

The same K jobs (the synthetic two-object photo, tiny learn settings, one prompt
generated) run as:

  * library calls: learn() then generate() per job in one Python process, the models
    loaded per job as they are inside batch (the work itself, no process start);
  * a shell loop: `scenebreak learn` then `scenebreak generate` per job, a new process each;
  * `scenebreak batch --devices cpu` (1 worker), and `cpu,cpu,...` for more workers;
  * `scenebreak batch --ray` on a local Ray cluster (ray.cluster_utils.Cluster, real
    GCS/raylet/worker processes) with as many CPUs as workers (needs Ray);
  * a rerun of `batch` with every job done (what checking and skipping costs).

Each run starts from an empty SCENEBREAK_HOME and output folder. Every torch process
gets one thread (OMP_NUM_THREADS=1), so more workers means more cores used.

    OMP_NUM_THREADS=1 python benchmarks/batch_overhead.py --jobs 6 --workers 1 2

    OMP_NUM_THREADS=1 python benchmarks/batch_overhead.py --jobs 6 --steps 40 --name batch_overhead-cpu-40steps

Prints a table and writes benchmarks/results/batch_overhead-cpu.md (and .json; --name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from figures import save_results  # noqa: E402


def job_lines(folder: Path, model: Path, count: int, steps: int) -> Path:
    from helpers import write_synthetic_scene

    write_synthetic_scene(folder / "in")
    learn = {"steps1": steps, "steps2": steps, "no-prior": True, "base-model": str(model)}
    jobs = [{"photo": "in/photo.png", "masks": ["in/red.png", "in/blue.png"], "name": f"job{i}", "learn": {**learn, "seed": i},
             "prompts": ["a photo of <asset1>"], "generate": {"steps": 2, "seed": i}} for i in range(count)]
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def fresh(work: Path) -> dict:
    """An empty cache and output for one run; the environment its processes get."""
    for name in ("home", "out"):
        shutil.rmtree(work / name, ignore_errors=True)
    env = dict(os.environ, SCENEBREAK_HOME=str(work / "home"), HF_HUB_OFFLINE="1", SCENEBREAK_DEVICE="cpu",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    return env


def timed(args: list[str], env: dict, cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(args[:4])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def library_calls(work: Path, jobs: Path, env: dict) -> float:
    """learn() + generate() per job, in one fresh process (imports not counted)."""
    code = f"""
import json, sys, time
from pathlib import Path
from scenebreak import LearnConfig, GenerateConfig, learn, generate
from scenebreak.batch.jobs import read_jobs
jobs = read_jobs({str(jobs)!r})
started = time.perf_counter()
for job in jobs:
    scene = learn(job.photo, list(job.masks), job.learn, name=job.name, base_model=job.base_model, device="cpu")
    generate(scene.path, list(job.prompts), job.generate, out_dir={str(work / 'out')!r}, device="cpu")
print(time.perf_counter() - started)
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=work, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return float(done.stdout.strip().splitlines()[-1])


def shell_loop(work: Path, jobs: Path, env: dict) -> float:
    from scenebreak.batch.jobs import read_jobs

    started = time.perf_counter()
    for job in read_jobs(jobs):
        opts = job.raw["learn"]
        timed([sys.executable, "-m", "scenebreak", "learn", job.photo, "--masks", *job.masks, "--name", job.name, "-q",
               "--steps1", str(opts["steps1"]), "--steps2", str(opts["steps2"]), "--no-prior", "--seed", str(opts["seed"]),
               "--base-model", opts["base-model"]], env, work)
        timed([sys.executable, "-m", "scenebreak", "generate", job.name, *job.prompts, "--steps", "2", "--seed",
               str(job.raw["generate"]["seed"]), "--out-dir", str(work / "out"), "-q"], env, work)
    return time.perf_counter() - started


def batch(work: Path, jobs: Path, env: dict, extra: list[str]) -> float:
    return timed([sys.executable, "-m", "scenebreak", "batch", str(jobs), "--out", str(work / "out"), "-q", *extra], env, work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=4, help="steps of each learn phase")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="batch_overhead-cpu", help="results file name, without .md/.json")
    args = parser.parse_args()

    from tinymodels import build_tiny_model

    rows = []
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny-sd")
        jobs = job_lines(work, model, args.jobs, args.steps)

        def add(way: str, workers: int, seconds: float) -> None:
            row = {"way": way, "workers": workers, "jobs": args.jobs, "seconds": round(seconds, 1),
                   "s_per_job": round(seconds / args.jobs, 2), "jobs_per_min": round(60 * args.jobs / seconds, 1)}
            rows.append(row)
            print(f"{way:<40} {workers:>2} worker(s) {seconds:7.1f} s  {row['s_per_job']:6.2f} s/job", file=sys.stderr)

        add("library calls (one process)", 1, library_calls(work, jobs, fresh(work)))
        add("shell loop (learn + generate per job)", 1, shell_loop(work, jobs, fresh(work)))
        for n in args.workers:
            env = fresh(work)
            add("batch --devices " + ",".join(["cpu"] * n), n, batch(work, jobs, env, ["--devices", ",".join(["cpu"] * n)]))
        add("batch rerun, every job done (skips)", 1, batch(work, jobs, env, []))
        if not args.no_ray:
            try:
                from ray.cluster_utils import Cluster
            except ImportError:
                print("Ray is not installed: no Ray rows", file=sys.stderr)
            else:
                for n in args.workers:
                    env = fresh(work)
                    os.environ.update(PYTHONPATH=env["PYTHONPATH"], OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
                    started = time.perf_counter()
                    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": n, "include_dashboard": False})
                    up = time.perf_counter() - started
                    try:
                        seconds = batch(work, jobs, env, ["--ray", cluster.address])
                    finally:
                        cluster.shutdown()
                    add(f"batch --ray (local cluster, {n} CPU; start {up:.0f} s not counted)", n, seconds)

    import torch

    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "steps": args.steps, "date": time.strftime("%Y-%m-%d"),
            "load_before": load_before, "load_after": round(os.getloadavg()[0], 2),
            "command": "OMP_NUM_THREADS=1 python benchmarks/batch_overhead.py " + " ".join(sys.argv[1:])}
    base = next(r["seconds"] for r in rows if r["way"].startswith("library"))
    one = next(r["seconds"] for r in rows if r["way"] == "batch --devices cpu")
    lines = ["# batch overhead (CPU, tiny random SD)", "",
             f"{args.jobs} jobs, each: learn {args.steps}+{args.steps} steps (no prior) at 64x64, then one image at 2 "
             f"sampling steps. One torch thread per process. {info['cpus']} CPU cores on {info['machine']} (load "
             f"average {info['load_before']} before the runs, {info['load_after']} after: other work shared them), "
             f"torch {info['torch']}, {info['date']}. `{info['command']}`", "",
             "| way | workers | seconds | s/job | jobs/min | time / library calls' | time / 1 batch worker's |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['way']} | {r['workers']} | {r['seconds']} | {r['s_per_job']} | {r['jobs_per_min']} | "
                     f"{r['seconds'] / base:.2f} | {r['seconds'] / one:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    save_results(args.results_dir, args.name, text, {"info": info, "rows": rows})


if __name__ == "__main__":
    main()
