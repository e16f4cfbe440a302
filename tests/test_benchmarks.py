"""The benchmarks' own code paths, on the tiny models: a benchmark that breaks only shows
up on the GPU machine, where each minute is scarce (the baseline once failed there).
FLUX's rows go through the same build as the real architecture (meta device, then
memory per row), and the smoke test's FLUX variants run as on CUDA."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def train_step():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", BENCHMARKS / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("phase", [1, 2])
def test_original_style_baseline_trains_on_the_tiny_model(train_step, phase):
    source = train_step.ModelSource(tiny=True, reuse=True)
    row = train_step.measure("original-style", phase, 1, "cpu", 64, source)
    assert row["kind"] == "original-style" and row["steps_timed"] == 1 and row["s_per_step"] > 0


def test_the_step_profile_counts_the_work_of_a_rows_steps(train_step):
    """step_profile.py: a row's steps after the timed ones under torch.profiler, summarised."""
    import step_profile  # (train_step.py put benchmarks/ on the path)

    source = train_step.ModelSource(tiny=True, reuse=True)
    row = train_step.measure("scenebreak LoRA", 2, 1, "cpu", 64, source, profile_steps=2)
    profile = row["profile"]
    assert row["steps_timed"] == 1 and profile["steps_profiled"] == 2
    assert profile["aten_ops_per_step"] > 100 and profile["top_ops"][0]["ms_per_step"] > 0
    assert "| 2 | scenebreak LoRA |" in step_profile.markdown([row], ["# header"])


def test_the_gpus_busy_time_is_the_union_of_its_kernels_intervals():
    from collections import namedtuple

    sys.path.insert(0, str(BENCHMARKS))
    import step_profile

    span = namedtuple("span", "start end")
    assert step_profile.busy_us([span(20, 30), span(0, 10), span(5, 15), span(21, 22)]) == 25


def test_the_step_profile_summarises_a_gpus_events(train_step):
    """The CUDA half of step_profile.summarise, on made-up events of two steps as
    torch.profiler gives them: kernels on the device, runtime calls and aten operations
    on the host."""
    from types import SimpleNamespace

    import step_profile
    from torch.autograd import DeviceType

    def event(name, device=DeviceType.CPU, start=0, end=0, children=(), cpu_us=0.0, device_us=0.0):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end,
                               elapsed_us=lambda: end - start), cpu_children=list(children), self_cpu_time_total=cpu_us,
                               self_device_time_total=device_us)

    mm = event("aten::mm", device_us=300)
    events = [event("aten::linear", children=[mm]), mm, event("aten::view"),
              event("cudaLaunchKernel"), event("cudaLaunchKernel"), event("cudaGraphLaunch"),
              event("cudaDeviceSynchronize"), event("cudaDeviceSynchronize"), event("cudaStreamSynchronize"),
              event("ampere_sgemm", DeviceType.CUDA, 0, 300), event("ampere_sgemm", DeviceType.CUDA, 200, 500),
              event("Memcpy DtoH (Device -> Pinned)", DeviceType.CUDA, 600, 700)]
    summary = step_profile.summarise(events, 2, True, 0.01)
    assert summary["device_busy_ms_per_step"] == 0.3  # (500 + 100) us of union over 2 steps
    assert summary["kernels_per_step"] == 1 and summary["launch_calls_per_step"] == 1.5
    assert summary["graph_launches_per_step"] == 0.5 and summary["dtoh_copies_per_step"] == 0.5
    assert summary["host_syncs_per_step"] == 0.5  # 3 over 2 steps, less the benchmark's own one a step
    assert summary["aten_ops_per_step"] == 0.5  # aten::mm only: linear calls it, view is no kernel
    assert summary["top_kernels"][0] == {"name": "ampere_sgemm", "ms_per_step": 0.3, "calls_per_step": 1.0}
    assert summary["top_ops"][0]["name"] == "aten::mm"
    row = {"kind": "scenebreak", "phase": 2, "precision": "bf16", "s_per_step": 0.003, "profile": summary}
    table = step_profile.markdown([row], ["# header"])
    assert "| 2 | scenebreak | bf16 | 0.003 | 0.3 | 10% | 1 | 2 | 0 | 0.5 | 0.5 | 0 |" in table, table


def test_sdxl_note_says_what_auto_chose(train_step):
    rows = [{"kind": "scenebreak defaults", "phase": 1, "memory": "low", "tune": "lora", "half_frozen": True, "precision": "bf16"}]
    note = train_step.sdxl_defaults_note(rows, "cuda")
    assert "`--tune lora --memory low` with frozen weights in bf16" in note and "fp16 on CUDA" in note


# -- FLUX.1 (train_step.py --flux and cuda_smoke.py's flux variants) ----------------------------


@pytest.fixture
def flux_source(train_step):
    """The tiny FLUX as the real architecture is built: transformer and T5 on the meta device."""
    return train_step.ModelSource(tiny=True, reuse=True, flux=True)


def test_flux_rows_train_with_the_handles_t5_reads_and_keep_the_template_lazy(train_step, flux_source):
    defaults = train_step.measure("scenebreak defaults", 1, 1, "cpu", 64, flux_source)
    assert (defaults["tune"], defaults["memory"]) == ("lora", "low") and defaults["steps_timed"] == 1
    assert defaults["built"] == "fp32, as learn loads them" and defaults["s_per_step"] > 0
    fast = train_step.measure("scenebreak LoRA fast", 2, 1, "cpu", 64, flux_source)
    assert (fast["tune"], fast["memory"]) == ("lora", "fast")
    template = flux_source.template[0]  # each row materialised its own copy
    assert train_step.is_lazy(template.denoiser) and train_step.is_lazy(template.text_encoders[1])


def test_flux_generation_row_is_one_image_at_28_flow_steps(train_step, flux_source):
    row = train_step.measure_generation("one image per call", 1, "cpu", 64, flux_source)
    assert (row["scheduler"], row["steps"], row["batch"]) == ("flow", 28, 1) and row["s_per_image"] > 0


def test_materialise_initialises_every_weight_and_keeps_t5s_table_tied(train_step):
    from scenebreak.device import choose_device

    components, _ = train_step.random_flux(tiny=True)
    train_step.materialise(components, choose_device("cpu"), torch.bfloat16, "test")
    t5 = components.text_encoders[1]
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    for model in (components.denoiser, t5):
        for name, param in model.named_parameters():
            assert param.dtype == torch.bfloat16 and torch.isfinite(param).all(), name
            if "norm" not in name and not name.endswith("bias"):
                assert param.float().std() > 0, name  # random, not zeros or constant memory


def test_flux_weights_that_do_not_fit_in_fp32_are_built_as_the_trainer_keeps_them(train_step, monkeypatch):
    from scenebreak.device import choose_device
    from scenebreak.train.memory import MemoryPlan

    components, _ = train_step.random_flux(tiny=True)
    fp32 = train_step.lazy_bytes(components, 4)
    monkeypatch.setattr("scenebreak.train.memory.available_bytes", lambda device: fp32)  # fp32 over 90%, bf16 under
    half = MemoryPlan("low", True, True, False, False, tune="lora", half_frozen=True)
    built = train_step.materialise_for_training(components, choose_device("cpu"), half, torch.bfloat16)
    assert built.startswith("bf16, as the trainer keeps frozen weights") and components.denoiser.dtype == torch.bfloat16
    components, _ = train_step.random_flux(tiny=True)
    full = MemoryPlan("fast", False, False, False, False, tune="lora", half_frozen=False)
    with pytest.raises(train_step.DoesNotFit, match="fp32"):
        train_step.materialise_for_training(components, choose_device("cpu"), full, torch.bfloat16)


def test_flux_that_cannot_fit_says_so_in_one_line(train_step, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("scenebreak.train.memory.available_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--flux", "--results-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        train_step.main()
    message = str(exit_.value.code)
    assert "\n" not in message and "does not fit this machine" in message and "FLUX needs a GPU" in message
    assert not (tmp_path / "out").exists()


def test_flux_rows_at_two_depths_extrapolate_affinely_to_19(train_step):
    rows = [{"phase": 1, "kind": "k", "depth": 1, "s_per_step": 10.0, "peak_gib": 5.0},
            {"phase": 1, "kind": "k", "depth": 2, "s_per_step": 12.0, "peak_gib": 6.0, "built": "bf16 ..."},
            {"phase": 2, "kind": "k", "depth": 1, "s_per_step": 1.0, "peak_gib": 1.0},
            {"phase": 2, "kind": "k", "depth": 2, "error": "does not fit: ..."}]
    [row] = train_step.extrapolate(rows, [1, 2])
    assert row["phase"] == 1 and row["depth"] == 19 and row["extrapolated"] and "built" not in row
    assert row["s_per_step"] == pytest.approx(10 + 2 * 18) and row["peak_gib"] == pytest.approx(5 + 18)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("cuda_smoke_benchmark", BENCHMARKS / "cuda_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SCENEBREAK_HOME", str(tmp_path_factory.mktemp("home")))  # Smoke sets its own: put back after
        patch.setattr(module, "SHORT", dict(steps1=1, steps2=1, num_class_images=1))
        yield module.Smoke("cpu", None)


@pytest.mark.parametrize("variant", ["flux-lora", "flux-resume", "flux-sampling", "sampling"])
def test_smoke_variants_run_on_the_cpu(smoke, variant):
    row = smoke.run(variant)
    assert row["ok"] is True, row


# -- learn_wall.py (the GPU check's `wall` part) -------------------------------------------------


def test_learn_wall_extrapolates_each_run_to_400_400_at_its_own_steady_rates():
    spec = importlib.util.spec_from_file_location("learn_wall_benchmark", BENCHMARKS / "learn_wall.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stamps = {"imported": 1.0, "phase 1 first": 20.0, "phase 1 last": 29.9, "phase 1 steps": 100,
              "phase 2 first": 30.2, "phase 2 last": 50.0, "phase 2 steps": 100}
    row = module.summarise({"run": "plain", "ok": True, "wall_s": 52.0, "steps1": 100, "steps2": 100}, stamps)
    assert row["p1_s_per_step"] == pytest.approx(0.1) and row["p2_s_per_step"] == pytest.approx(0.2)
    assert row["after_last_step_s"] == pytest.approx(2.0)
    assert row["est_400_400_s"] == pytest.approx(52.0 + 300 * 0.1 + 300 * 0.2)
    table = module.render([row], "# header")
    assert "| plain | 100+100 | 52.0 |" in table and "| 142.0 |" in table


# -- train_step.py's bf16-weights row (issue 22: bf16 weights, fp32 masters, no per-step casts) --


def test_bf16_weights_with_fp32_masters_train_as_bf16_autocast_does(train_step, monkeypatch, scene_files, tiny_model):
    """The row's trainer on the tiny model: phase 2 runs with the UNet's weights in bf16
    and AdamW on fp32 masters, and every loss is the plain bf16-autocast run's to bf16's
    own tolerance. That tolerance is measured, not guessed: the two bf16 runs round
    differently (bf16 weights also feed the norms; the clipping norm is over bf16
    gradients), so each loss may differ between them by as much as bf16 autocast moves
    it from an fp32 run. The attention term is the one bf16 moves most (its maps come
    from a bf16 softmax: about 5% on the tiny model, while the total moves <0.1%)."""
    import scenebreak.train.trainer as trainer_module
    from scenebreak import LearnConfig, learn
    from scenebreak.train.trainer import LOSS_NAMES

    monkeypatch.setenv("SCENEBREAK_CPU_BF16", "1")  # bf16 on any CPU (emulated where it has no bf16 instructions)
    seen, dtypes, weights = [], [], []
    real_step = trainer_module.Trainer.train_step

    def step(self, phase, steps):
        record = real_step(self, phase, steps)
        seen.append(record.losses.tolist())
        dtypes.append((phase, next(self.c.denoiser.parameters()).dtype, type(self.optimizer).__name__))
        # The fp32 values AdamW steps: the masters where there are some, else the weights.
        pairs = getattr(self.optimizer, "pairs", ())
        masters = {id(p): m for p, m in pairs}
        assert all(p.equal(m.to(p.dtype)) for p, m in pairs)  # the weights carry the masters' values
        weights.append(torch.cat([masters.get(id(p), p).detach().float().flatten()
                                  for p in self.c.denoiser.parameters()]))
        return record

    def run(name, mixed_precision):
        seen.clear(), dtypes.clear(), weights.clear()
        config = LearnConfig(steps1=1, steps2=3, num_class_images=1, seed=3, tune="full", memory="fast",
                             mixed_precision=mixed_precision)
        learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name=name, device="cpu")
        return list(seen), weights[-1] - weights[0]  # what phase 2 did to the UNet

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    fp32, _ = run("fp32", "no")
    plain, plain_update = run("plain", "bf16")
    assert {d[1] for d in dtypes} == {torch.float32}
    monkeypatch.setattr(trainer_module, "Trainer", train_step.make_bf16_master_trainer(trainer_module.Trainer))
    masters, masters_update = run("masters", "bf16")
    assert [d for d in dtypes if d[0] == 2] == [(2, torch.bfloat16, "MasterAdamW")] * 3
    assert len(masters) == len(plain) == len(fp32) == 4
    assert masters[:2] == plain[:2]  # phase 1 and the first phase-2 step see the very same weights
    for term, name in enumerate(LOSS_NAMES):
        bf16_spread = max(abs(p[term] - f[term]) for p, f in zip(plain, fp32))
        for step_index, (a, b) in enumerate(zip(plain, masters)):
            # Twice the spread: each bf16 run may sit on either side of the fp32 one.
            assert abs(a[term] - b[term]) <= max(2 * bf16_spread, 1e-2 * abs(a[term]), 1e-4), (name, step_index)
    total = LOSS_NAMES.index("loss")
    assert all(b[total] == pytest.approx(a[total], rel=2e-3) for a, b in zip(plain, masters))
    # Three steps barely move the losses, so the update itself is compared: the masters
    # take the steps the plain run's fp32 weights take (lr 2e-6 is below bf16's resolution
    # for these weights, which is why the masters exist).
    assert plain_update.norm() > 0
    assert torch.nn.functional.cosine_similarity(plain_update, masters_update, dim=0) > 0.95
    assert float(masters_update.norm() / plain_update.norm()) == pytest.approx(1, rel=0.05)


def test_lora_phase1_compares_adapters_off_with_peft_and_saves_the_table(monkeypatch, tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    import lora_phase1

    monkeypatch.setattr(sys, "argv", ["lora_phase1.py", "--tiny", "--resolution", "64", "--steps", "1",
                                      "--results-dir", str(tmp_path)])
    lora_phase1.main()
    table = (tmp_path / "lora_phase1-cpu-tiny.md").read_text()
    assert "| adapters off (scenebreak) |" in table and "| adapters as peft runs them |" in table
    import scenebreak.train.trainer as trainer

    assert trainer.Trainer._adapters_for.__name__ == "_adapters_for"  # put back after the second row


def test_mask_click_times_both_ways_and_saves_the_table(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mask_click

    rows = mask_click.main(["--megapixels", "0.05", "--clicks", "1", "--results-dir", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["kept_sizes_ms"] > 0 and rows[0]["processor_per_click_ms"] > 0
    table = (tmp_path / "mask_click-cpu.md").read_text()
    assert "processor per click" in table and rows[0]["photo"] in table


def test_the_dilation_benchmark_runs_and_both_ways_give_the_same_pixels(tmp_path):
    """benchmarks/dilate.py on a small photo: its table is written and the earlier sweep
    it keeps for comparison agrees with masks.ops.dilate (else the figures compare
    different work)."""
    spec = importlib.util.spec_from_file_location("dilate_benchmark", BENCHMARKS / "dilate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--megapixels", "0.05", "--radii", "3", "40", "--results-dir", str(tmp_path)])
    assert [r["radius"] for r in rows] == [3, 40] and all(r["same_pixels"] for r in rows)
    assert "| 40 |" in (tmp_path / "dilate-cpu.md").read_text()
