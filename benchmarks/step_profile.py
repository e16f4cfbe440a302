"""Where a training step's time goes: torch.profiler over a few steps of the rows issue 22
is about, after train_step.py's warm-up and timed steps (which run unprofiled).

Per row: seconds per step (unprofiled); on a GPU, the time its kernels keep the GPU
busy per step (the union of their intervals) and that as a share of the step, kernels
per step, the host's launch calls per step (one cudaGraphLaunch replays a whole graph),
host synchronisations per step beyond the benchmark's own one, device-to-host copies;
everywhere, leaf aten operations per step (those that call no other: roughly what a
GPU without graphs launches one by one) and the operations with the most self time (device time on a GPU, CPU time on
the CPU).

A step whose GPU is busy for a small share of its wall time is bound by the host
(kernel launches, Python, waits): CUDA graphs and fewer, larger kernels pay there; a
step busy most of the time is bound by compute or memory traffic, where bf16 weights,
fused kernels and less traffic pay. The table says which, per row, before any of
issue 22's ideas is kept or dropped.

    python benchmarks/step_profile.py --device cuda     # SD2.1-base: phases 1 and 2, LoRA, original-style
    python benchmarks/step_profile.py --device cuda --sdxl
    python benchmarks/step_profile.py --tiny            # a dry run on the CPU (the tests' tiny model)
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ROWS = [(1, "scenebreak"), (2, "scenebreak"), (2, "scenebreak LoRA"), (1, "original-style"), (2, "original-style")]
SDXL_ROWS = [(1, "scenebreak defaults"), (2, "scenebreak LoRA")]
FLUX_ROWS = [(1, "scenebreak defaults"), (2, "scenebreak LoRA fast")]
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
TOP = 10


def profile_steps(run, steps: int, device) -> dict:
    """Run `steps` more steps of the trainer's `run` generator under torch.profiler and
    summarise them (see the module's docstring)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _record in itertools.islice(run, steps):
            device.synchronize()
    wall = (time.perf_counter() - started) / steps
    return summarise(prof.events(), steps, cuda, wall)


def summarise(events, steps: int, cuda: bool, profiled_wall_s: float) -> dict:
    from torch.autograd import DeviceType

    on_device = [e for e in events if e.device_type != DeviceType.CPU]
    on_host = [e for e in events if e.device_type == DeviceType.CPU]
    per_step = lambda n: round(n / steps, 1)  # noqa: E731
    summary = {"steps_profiled": steps, "profiled_s_per_step": profiled_wall_s,
               "aten_ops_per_step": per_step(sum(is_leaf_op(e) for e in on_host))}
    if cuda:
        kernels = [e for e in on_device if not e.name.startswith(("Memcpy", "Memset"))]
        summary.update(
            device_busy_ms_per_step=busy_us([e.time_range for e in on_device]) / 1000 / steps,
            kernels_per_step=per_step(len(kernels)),
            launch_calls_per_step=per_step(sum(e.name in LAUNCH_CALLS for e in on_host)),
            graph_launches_per_step=per_step(sum(e.name == "cudaGraphLaunch" for e in on_host)),
            # the benchmark synchronises once after each step to time it
            host_syncs_per_step=max(0.0, per_step(sum(e.name in SYNC_CALLS for e in on_host)) - 1),
            dtoh_copies_per_step=per_step(sum(e.name.startswith("Memcpy DtoH") for e in on_device)),
            top_kernels=top(on_device, steps, lambda e: e.time_range.elapsed_us()),
            top_ops=top([e for e in on_host if e.name.startswith("aten::")], steps, self_device_us))
    else:
        summary["top_ops"] = top([e for e in on_host if e.name.startswith("aten::")], steps, lambda e: e.self_cpu_time_total)
    return summary


# Operations that only make a new view of a tensor, or allocate one, or read a flag:
# no kernel on a GPU.
NO_KERNEL = {f"aten::{name}" for name in (
    "view", "_unsafe_view", "as_strided", "_reshape_alias", "reshape", "resolve_conj", "resolve_neg", "detach", "alias",
    "empty", "empty_strided", "empty_like", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice",
    "select", "split", "chunk", "unbind", "narrow", "lift_fresh", "_nnpack_available", "is_nonzero", "set_", "resize_",
    "to", "_to_copy", "contiguous", "numpy_T", "unflatten", "flatten")}


def is_leaf_op(event) -> bool:
    """An aten operation that does work itself: calls no other aten operation (aten::linear
    calls aten::addmm, which does the work) and is not a view or an allocation; roughly
    one kernel each, what a GPU without graphs launches one by one (aten::to and
    aten::_to_copy count by the aten::copy_ they call)."""
    return (event.name.startswith("aten::") and event.name not in NO_KERNEL
            and not any(c.name.startswith("aten::") for c in event.cpu_children))


def self_device_us(event) -> float:
    """An operation's own device time (its kernels, not its children's); torch < 2.4 called it CUDA time."""
    value = getattr(event, "self_device_time_total", None)
    return value if value is not None else getattr(event, "self_cuda_time_total", 0)


def busy_us(ranges) -> float:
    """The length of the union of [start, end) intervals, in microseconds."""
    total, end = 0.0, float("-inf")
    for r in sorted(ranges, key=lambda r: r.start):
        if r.end > end:
            total += r.end - max(r.start, end)
            end = r.end
    return total


def top(events, steps: int, cost) -> list[dict]:
    """The TOP names by total `cost` (microseconds), per step."""
    totals, calls = {}, {}
    for e in events:
        totals[e.name] = totals.get(e.name, 0.0) + cost(e)
        calls[e.name] = calls.get(e.name, 0) + 1
    ranked = sorted(totals, key=totals.get, reverse=True)[:TOP]
    return [{"name": name[:90], "ms_per_step": round(totals[name] / 1000 / steps, 3), "calls_per_step": calls[name] / steps}
            for name in ranked if totals[name] > 0]


def markdown(rows: list[dict], header: list[str]) -> str:
    cuda = any("device_busy_ms_per_step" in r.get("profile", {}) for r in rows)
    lines = [*header, ""]
    if cuda:
        lines += ["| phase | code | precision | s/step | GPU busy ms/step | GPU busy share | kernels/step | launch calls/step "
                  "| graph launches/step | syncs/step | DtoH copies/step | leaf aten ops/step |", "|---" * 12 + "|"]
    else:
        lines += ["| phase | code | precision | s/step | profiled s/step | leaf aten ops/step |", "|---" * 6 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['phase']} | {r['kind']} | | error: {r['error'][:120]} |")
            continue
        p = r["profile"]
        if cuda:
            share = p["device_busy_ms_per_step"] / 1000 / r["s_per_step"]
            lines.append(f"| {r['phase']} | {r['kind']} | {r['precision']} | {r['s_per_step']:.3f} | "
                         f"{p['device_busy_ms_per_step']:.1f} | {share:.0%} | {p['kernels_per_step']:.0f} | "
                         f"{p['launch_calls_per_step']:.0f} | {p['graph_launches_per_step']:.0f} | "
                         f"{p['host_syncs_per_step']:.1f} | {p['dtoh_copies_per_step']:.1f} | {p['aten_ops_per_step']:.0f} |")
        else:
            lines.append(f"| {r['phase']} | {r['kind']} | {r['precision']} | {r['s_per_step']:.3f} | "
                         f"{p['profiled_s_per_step']:.3f} | {p['aten_ops_per_step']:.0f} |")
    for r in rows:
        if "error" in r:
            continue
        p = r["profile"]
        for key, what in (("top_kernels", "kernels by GPU time"), ("top_ops", "operations by self "
                                                                    + ("GPU" if cuda else "CPU") + " time")):
            if p.get(key):
                lines += ["", f"Phase {r['phase']}, {r['kind']}: {what} per step", "", "| name | ms/step | calls/step |",
                          "|---|---|---|"]
                lines += [f"| `{t['name']}` | {t['ms_per_step']:.3f} | {t['calls_per_step']:.1f} |" for t in p[key]]
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    import train_step
    from scenebreak.device import choose_device

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (unprofiled) after the warm-up")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps after the timed ones")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (--tiny: 64; SDXL and FLUX: 1024)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model (dry runs)")
    parser.add_argument("--sdxl", action="store_true", help="the SDXL base architecture")
    parser.add_argument("--flux", action="store_true", help="the FLUX.1-dev architecture (GPU)")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--jsonl", type=Path, help="also append each row here as soon as it is measured")
    args = parser.parse_args()
    large = args.sdxl or args.flux
    resolution = args.resolution or ((256 if args.sdxl else 64) if args.tiny else (1024 if large else 512))
    device = choose_device(args.device)
    source = train_step.ModelSource(args.tiny, reuse=True, sdxl=args.sdxl, flux=args.flux)
    rows = []
    stem = (f"step_profile-{device.type}" + ("-sdxl" if args.sdxl else "") + ("-flux" if args.flux else "")
            + ("-tiny" if args.tiny else ""))
    header = ["# Where a training step's time goes (torch.profiler)", "",
              f"- machine: {train_step.machine(args.device)}; device: {device.type}; torch {torch.__version__}",
              f"- model: {'the tiny test model' if args.tiny else 'FLUX.1-dev' if args.flux else 'SDXL base' if args.sdxl else 'SD2.1-base'} "
              f"architecture, random weights; {resolution}x{resolution}; batch 2 with prior (phase 1 runs the instance only)",
              f"- s/step: {args.steps} unprofiled steps after the warm-up; then {args.profile_steps} steps under the profiler",
              f"- date: {datetime.date.today()}; command: `python benchmarks/step_profile.py "
              + " ".join(a for a in sys.argv[1:]) + "`"]
    for phase, kind in FLUX_ROWS if args.flux else SDXL_ROWS if args.sdxl else ROWS:
        print(f"profiling {kind}, phase {phase} ...", file=sys.stderr, flush=True)
        train_step.start_row(device)
        try:
            row = train_step.measure(kind, phase, args.steps, args.device, resolution, source,
                                     profile_steps=args.profile_steps)
        except Exception as error:  # out of memory, say: the row's, and the next one runs
            import traceback

            traceback.print_exc()
            row = {"kind": kind, "phase": phase, "error": f"{type(error).__name__}: {error}"[:300]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"part": "profile", "table": stem, **row}) + "\n")
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        (args.results_dir / f"{stem}.md").write_text(markdown(rows, header))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
