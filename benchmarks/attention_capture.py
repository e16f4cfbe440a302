"""What recording the attention-loss maps costs: one forward and backward pass of the
UNet with the maps recorded as scenebreak records them, against the same pass with
no map recorded (fused attention everywhere) and against materialising the whole
batch's attention in the loss layers (how scenebreak did it before: the softmax of
every token for every example, kept for the backward pass).

    python benchmarks/attention_capture.py --arch tiny-sdxl
    python benchmarks/attention_capture.py --arch sdxl --resolution 512

Each variant runs in a fresh process (so its peak memory is its own), one after the
other; bf16 autocast where the device has it, batch 2 (instance + class image),
gradients to the text conditioning (as in phase 1). Prints a table and saves it to
benchmarks/results/attention_capture-<arch>-<device>.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from figures import save_results  # noqa: E402

VARIANTS = ("none", "materialised", "columns")


class MaterialisedProcessor:
    """The previous recording processor: the whole batch's attention probabilities
    (all 77 tokens, fp32) computed and kept, the block output from them."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        import torch

        from scenebreak.device import autocast_off

        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        with autocast_off(query.device.type):
            probs = torch.matmul(query.float() * attn.scale, key.float().transpose(-1, -2)).softmax(-1)
        self.store.maps[self.name] = probs[0]
        out = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out.to(query.dtype))) / attn.rescale_output_factor


def build(arch: str):
    import torch
    from accelerate.utils import set_seed
    from diffusers import UNet2DConditionModel

    from tinymodels import sd21_base_configs, sdxl_configs, tiny_configs, tiny_sdxl_configs

    configs = {"tiny": tiny_configs, "tiny-sdxl": tiny_sdxl_configs, "sd21": sd21_base_configs, "sdxl": sdxl_configs}[arch]()
    set_seed(0)
    unet = UNet2DConditionModel(**configs["unet"])
    vae_factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    return unet.requires_grad_(False), vae_factor, torch


def one(arch: str, variant: str, resolution: int, device_name: str, repeats: int) -> dict:
    from scenebreak.families.unet import cross_attention_layers
    from scenebreak.train.attention import AttentionStore, capture_cross_attention
    from scenebreak.device import choose_device

    unet, factor, torch = build(arch)
    device = choose_device(device_name)
    amp = device.train_dtype("auto")
    unet.to(device.torch)
    side = resolution // factor
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, side, side, generator=g).to(device.torch)
    t = torch.tensor([100, 700], device=device.torch)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device.torch)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=g).to(device.torch),
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2, dtype=torch.float32, device=device.torch)}
    layers = cross_attention_layers(unet)
    store = AttentionStore(0)
    if variant == "columns":
        store.columns = [5, 7]
    if variant == "materialised":
        original = dict(unet.attn_processors)
        unet.set_attn_processor({n: MaterialisedProcessor(store, n) if n in layers else p for n, p in original.items()})

    def step():
        embeds = text.clone().requires_grad_(True)
        with device.autocast(amp):
            out = unet(latents, t, embeds, added_cond_kwargs=added).sample
        loss = out.float().square().mean()
        if variant != "none":
            loss = loss + store.token_maps([5, 7]).square().mean()
        loss.backward()
        store.clear()
        device.synchronize()

    import contextlib

    context = capture_cross_attention(unet, store, layers) if variant == "columns" else contextlib.nullcontext()
    with context:
        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device.torch)
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        seconds = (time.perf_counter() - started) / repeats
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device.torch) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"arch": arch, "variant": variant, "resolution": resolution, "maps": f"{side // 4}x{side // 4}",
            "loss_layers": len(layers), "s_per_pass": seconds, "peak_gib": peak,
            "precision": str(amp).replace("torch.", "") if amp else "fp32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("tiny", "tiny-sdxl", "sd21", "sdxl"), default="tiny-sdxl")
    parser.add_argument("--resolution", type=int, default=None, help="default: the architecture's native size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    native = {"tiny": 64, "tiny-sdxl": 256, "sd21": 512, "sdxl": 1024}[args.arch]
    resolution = args.resolution or native
    if args.one:
        print(json.dumps(one(args.arch, args.one, resolution, args.device, args.repeats)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--arch", args.arch, "--resolution", str(resolution), "--device", args.device,
               "--repeats", str(args.repeats), "--one", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
            "arch": args.arch, "variant": variant, "error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:200]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    import torch

    base = next((r for r in rows if r["variant"] == "none" and "error" not in r), None)
    lines = [f"# Attention capture cost: {args.arch} at {resolution}x{resolution} ({args.device})", "",
             f"- torch {torch.__version__}; one forward + backward of the UNet, batch 2, gradients to the text "
             f"conditioning; {args.repeats} timed passes after a warm-up; each variant in its own process",
             "- none: no map recorded (fused attention everywhere); materialised: the previous way (the whole "
             "batch's softmax over all 77 tokens in the loss layers); columns: scenebreak now (fused block output, "
             "the instance's scores for the log-sum-exp, two handle columns kept)",
             f"- date: {time.strftime('%Y-%m-%d')}; command: `python benchmarks/attention_capture.py --arch {args.arch}"
             f"{'' if resolution == native else f' --resolution {resolution}'}{'' if args.device == 'cpu' else f' --device {args.device}'}`",
             "", "| variant | loss layers | maps | precision | s/pass | vs none | peak GiB | vs none |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} | | | | | | |")
            continue
        vs_t = f"{r['s_per_pass'] / base['s_per_pass']:.2f}x" if base else ""
        vs_m = f"{r['peak_gib'] - base['peak_gib']:+.2f}" if base else ""
        lines.append(f"| {r['variant']} | {r['loss_layers']} | {r['maps']} | {r['precision']} | {r['s_per_pass']:.3f} | {vs_t} | "
                     f"{r['peak_gib']:.2f} | {vs_m} |")
    lines += ["", "Peak memory is " + ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else
                                       "the process's peak RSS (weights included)") + "; 'vs none' is the difference in GiB."]
    text = "\n".join(lines) + "\n"
    print(text)
    save_results(HERE / "results", f"attention_capture-{args.arch}-{args.device.split(':')[0]}", text,
                 {"resolution": resolution, "rows": rows})


if __name__ == "__main__":
    main()
