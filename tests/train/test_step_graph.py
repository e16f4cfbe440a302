"""The training step as one graph (`learn --compile`, train/compiling.py): its forward
pass and losses trace whole under `torch.compile(fullgraph=True)` (a graph break raises),
on the tiny SD with gradient checkpointing and the attention capture, and on the tiny
FLUX with its joint-attention capture and LoRA; the compiled step's losses are the plain
step's; and what the compiler makes is kept under a key in scenebreak's cache folder."""

from __future__ import annotations

import os

import pytest
import torch

from scenebreak import LearnConfig, learn


def losses_of_each_step(monkeypatch) -> list[list[float]]:
    """The losses of every step of the next `learn`, as numbers (read after each step)."""
    import scenebreak.train.trainer as trainer

    seen: list[list[float]] = []
    real_step = trainer.Trainer.train_step

    def step(self, phase, steps):
        record = real_step(self, phase, steps)
        seen.append(record.losses.tolist())
        return record

    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    return seen


def compile_from_now_on(monkeypatch, check=None) -> None:
    """Trainers made from now on compile their step (`--compile`, which learn allows on
    CUDA only); `check(trainer)` after each is made."""
    import dataclasses

    import scenebreak.train.trainer as trainer

    real_init = trainer.Trainer.__init__

    def init(self, components, inputs, config, *args, **kwargs):
        real_init(self, components, inputs, dataclasses.replace(config, compile=True), *args, **kwargs)
        if check:
            check(self)

    monkeypatch.setattr(trainer.Trainer, "__init__", init)


@pytest.fixture
def compiling(monkeypatch):
    """`compiling["on"] = True` makes the next `learn` run its steps through
    torch.compile(fullgraph=True) with AOTAutograd compiling the backward too (inductor's
    code generation is a GPU's job); `compiling["calls"]` counts the compiled steps."""
    import scenebreak.train.trainer as trainer
    from scenebreak.train.compiling import prepare_dynamo

    real_init = trainer.Trainer.__init__
    state = {"on": False, "calls": 0, "graphs": 0}
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(graph, inputs):  # each graph dynamo traces: one per phase if the shapes never change
        state["graphs"] += 1
        return aot_eager(graph, inputs)

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if not state["on"]:
            return
        prepare_dynamo()  # the settings `--compile` uses
        compiled = torch.compile(self.step_losses, fullgraph=True, dynamic=False, backend=counting)

        def losses(batch):
            state["calls"] += 1
            return compiled(batch)

        self.losses_fn = losses

    monkeypatch.setattr(trainer.Trainer, "__init__", init)
    torch._dynamo.reset()
    yield state
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_the_step_compiles_whole_and_gives_the_plain_steps_losses(family, compiling, monkeypatch, scene_files,
                                                                   tiny_model, tmp_path):
    from tinymodels import build_tiny_flux

    model = build_tiny_flux(tmp_path / "flux") if family == "flux" else tiny_model
    # SD: full tuning with checkpointing (the capture inside recomputed blocks); FLUX: its LoRA.
    config = LearnConfig(steps1=3, steps2=3, num_class_images=1, seed=3,
                         **({"tune": "lora"} if family == "flux" else {"tune": "full", "memory": "low"}))
    losses = losses_of_each_step(monkeypatch)
    import scenebreak.train.trainer as trainer

    chosen_sets, real_sample = [], trainer.sample_handles
    monkeypatch.setattr(trainer, "sample_handles", lambda rng, n: chosen_sets.append(real_sample(rng, n)) or chosen_sets[-1])
    learn(scene_files["image"], scene_files["masks"], config, base_model=str(model), name="plain", device="cpu")
    plain = list(losses)
    losses.clear()
    compiling["on"] = True
    learn(scene_files["image"], scene_files["masks"], config, base_model=str(model), name="compiled", device="cpu")
    assert compiling["calls"] == 6  # every step went through the compiled graph: no graph break raised
    # Steps that chose different handles (one, both, in either order) share one graph per phase.
    assert len({tuple(c) for c in chosen_sets}) > 1 and compiling["graphs"] == 2
    assert len(plain) == len(losses) == 6
    for a, b in zip(plain, losses):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert any(row[3] > 0 for row in plain)  # the attention loss was in the graph


def test_the_compile_key_names_torch_the_device_and_the_shapes(monkeypatch, tmp_path):
    from scenebreak.device import Device
    from scenebreak.train import compiling

    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "home"))
    cpu = Device("cpu", "cpu")
    shapes = {"family": "SD 2.x", "latent": [4, 64], "prior": True}
    key = compiling.compile_key(cpu, shapes)
    assert key == compiling.compile_key(cpu, dict(shapes))  # stable
    assert compiling.compile_key(cpu, {**shapes, "latent": [4, 128]}) != key
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert compiling.compile_key(cpu, shapes) != key
    monkeypatch.undo()
    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(compiling, "device_identity", lambda device: {"type": "cuda", "name": "NVIDIA H200",
                                                                      "capability": [9, 0]})
    gpu = compiling.compile_key(cpu, shapes)
    monkeypatch.setattr(compiling, "device_identity", lambda device: {"type": "cuda", "name": "NVIDIA H100",
                                                                      "capability": [9, 0]})
    assert compiling.compile_key(cpu, shapes) not in (gpu, key)
    assert compiling.artifacts_file(key) == tmp_path / "home" / "compile" / f"{key}.bin"


def test_what_one_run_compiled_is_saved_under_its_key_and_loaded_by_the_next(monkeypatch, tmp_path):
    """A real inductor compile on the CPU: the artifacts land in the cache folder under the
    key, atomically; a fresh compiler state loads them; a damaged file is ignored."""
    from scenebreak.device import Device
    from scenebreak.train import compiling

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "home"))
    # What importing torch._dynamo leaves in the variable (in learn, diffusers imports it
    # long before the step compiles): torch's default, not a choice of the user's.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    key = compiling.compile_key(Device("cpu", "cpu"), {"test": 1})
    assert not compiling.load_artifacts(key)  # nothing yet

    def step(x):
        return (x.sin() * 2 + 1).sum()

    torch._dynamo.reset()
    try:
        compiled = compiling.compile_step(step)
        import os

        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "home" / "compile" / "inductor")
        x = torch.randn(8)
        assert torch.allclose(compiled(x), step(x))
        path = compiling.save_artifacts(key)
        assert path == compiling.artifacts_file(key) and path.stat().st_size > 0
        assert [p.name for p in path.parent.iterdir() if p.is_file()] == [path.name]  # no temporary left
        torch._dynamo.reset()
        assert compiling.load_artifacts(key)
        path.write_bytes(b"not artifacts")
        assert not compiling.load_artifacts(key)  # compiles again instead
    finally:
        torch._dynamo.reset()
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def test_a_compile_cache_the_user_chose_is_kept(monkeypatch, tmp_path):
    from scenebreak.train import compiling

    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compiling.use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    compiling.use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "home" / "compile" / "inductor")


def test_the_compile_mode_comes_from_the_environment_and_reaches_torch_compile(monkeypatch):
    """SCENEBREAK_COMPILE_MODE picks torch.compile's mode for --compile (the GPU
    benchmarks' knob for CUDA graphs); a wrong value is one clear error, torch's default
    passes no mode at all, and a backend other than inductor gets none."""
    from scenebreak.errors import InvalidInput
    from scenebreak.train import compiling

    monkeypatch.delenv("SCENEBREAK_COMPILE_MODE", raising=False)
    assert compiling.compile_mode() == "default"
    monkeypatch.setenv("SCENEBREAK_COMPILE_MODE", "reduce-overhead")
    assert compiling.compile_mode() == "reduce-overhead"
    monkeypatch.setenv("SCENEBREAK_COMPILE_MODE", "fastest please")
    with pytest.raises(InvalidInput, match="SCENEBREAK_COMPILE_MODE='fastest please' is not one of default"):
        compiling.compile_mode()

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    compiling.compile_step(len, mode="reduce-overhead")
    compiling.compile_step(len)
    compiling.compile_step(len, backend="aot_eager", mode="reduce-overhead")
    assert calls == [dict(dynamic=False, backend="inductor", mode="reduce-overhead"),
                     dict(dynamic=False, backend="inductor"), dict(dynamic=False, backend="aot_eager")]


def test_compiling_only_the_repeated_blocks_keeps_the_plain_steps_losses(monkeypatch, scene_files, tiny_model):
    """SCENEBREAK_COMPILE_SCOPE=blocks: the trainer compiles the UNet's transformer blocks
    in place (diffusers' regional compilation; here with AOTAutograd's eager backend) and
    not the step; the attention capture inside the checkpointed blocks still records,
    and every loss is the plain run's."""
    import dataclasses

    from scenebreak.train import compiling

    graphs, whole_steps = [], []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(graph, inputs):
        graphs.append(graph)
        return aot_eager(graph, inputs)

    real_blocks = compiling.compile_blocks
    monkeypatch.setattr(compiling, "compile_blocks", lambda denoiser, mode="default": real_blocks(denoiser, mode, counting))
    monkeypatch.setattr(compiling, "compile_step", lambda *args, **kwargs: whole_steps.append(args))
    config = LearnConfig(steps1=2, steps2=2, num_class_images=1, seed=3, tune="full", memory="fast")
    losses = losses_of_each_step(monkeypatch)
    learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name="plain", device="cpu")
    plain = list(losses)
    losses.clear()

    settings = lambda: (os.environ.get("TORCHINDUCTOR_CACHE_DIR"), torch._dynamo.config.recompile_limit)  # noqa: E731
    during = []

    def check(trainer):
        assert trainer.losses_fn == trainer.step_losses and not trainer.cuda_graphs
        during.append(settings())

    compile_from_now_on(monkeypatch, check)
    monkeypatch.setenv("SCENEBREAK_COMPILE_SCOPE", "blocks")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    before = settings()
    torch._dynamo.reset()
    try:
        learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name="blocks", device="cpu")
    finally:
        torch._dynamo.reset()
    assert graphs and not whole_steps
    # Compiling set inductor's cache folder and dynamo's recompile limit for the run; a
    # caller's own torch.compile after it has its own again.
    assert during[0] != before and settings() == before, (before, during, settings())
    assert len(plain) == len(losses) == 4
    # Phase 1 to fp32 rounding (the same ops on frozen blocks). In phase 2 the blocks are
    # traced again with their weights training, and under bf16 autocast (CPUs with bf16
    # instructions) the traced graph rounds in bf16 at other points than eager does: the
    # small attention term moves by bf16's own spread there (measured: 0.2% at the first
    # step of phase 2, 1.1% after Adam's first update of every weight); in fp32 it is
    # the same to 1e-6.
    from scenebreak.device import cpu_has_bf16

    phase_2 = dict(rel=3e-2, abs=1e-4) if cpu_has_bf16() else dict(rel=1e-4, abs=1e-6)
    for i, (a, b) in enumerate(zip(plain, losses)):
        assert b == (pytest.approx(a, rel=1e-4, abs=1e-6) if i < 2 else pytest.approx(a, **phase_2)), i
    assert any(row[3] > 0 for row in losses)  # the attention loss saw the maps recorded inside compiled blocks
    # Under checkpointing the recompute would not match what a compiled block saved: refused.
    from scenebreak.errors import InvalidInput

    with pytest.raises(InvalidInput, match="does not work with gradient checkpointing"):
        learn(scene_files["image"], scene_files["masks"], dataclasses.replace(config, memory="low"),
              base_model=str(tiny_model), name="blocks-low", device="cpu")


def test_the_cuda_graph_steps_mark_each_step_and_keep_their_losses_out_of_the_graphs_buffers(monkeypatch, scene_files,
                                                                                            tiny_model):
    """With CUDA graphs (reduce-overhead) the trainer tells the graphs where each step
    begins and copies the losses it keeps, since the graph's output buffer is reused by
    the next replay. On the CPU there are no graphs: the same code path runs, and the
    losses kept are each step's own tensor."""
    import scenebreak.train.trainer as trainer

    marks, kept = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    real_init, real_step = trainer.Trainer.__init__, trainer.Trainer.train_step

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.cuda_graphs = True
        losses_fn = self.losses_fn
        self.losses_fn = lambda batch: kept.append(losses_fn(batch)) or kept[-1]

    def step(self, phase, steps):
        record = real_step(self, phase, steps)
        assert record.losses.data_ptr() != kept[-1].data_ptr()  # a copy, not the function's own output
        return record

    monkeypatch.setattr(trainer.Trainer, "__init__", init)
    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=1, prior=False),
          base_model=str(tiny_model), name="graphs", device="cpu")
    assert len(marks) == len(kept) == 3


def test_compiling_the_whole_step_also_compiles_each_phases_update_and_keeps_the_plain_runs_losses(
        monkeypatch, scene_files, tiny_model):
    """SCENEBREAK_COMPILE_SCOPE=whole: besides the step, the update after the backward
    pass (gradient clipping and AdamW) is compiled once per phase, every step goes
    through it, and the losses are the plain run's. Where the update is not one AdamW
    step after the backward pass it is refused."""
    import dataclasses

    from scenebreak.errors import InvalidInput
    from scenebreak.train import compiling

    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    real_step, real_update = compiling.compile_step, compiling.compile_update
    # Through AOTAutograd's eager backend: inductor's code for the whole tiny model would
    # take minutes on the CPU (the next test compiles an update with inductor).
    monkeypatch.setattr(compiling, "compile_step", lambda fn, mode="default": real_step(fn, aot_eager, mode))
    compiled_updates, updates = [], []

    def compile_update(fn, mode="default"):
        compiled = real_update(fn, aot_eager, mode)
        compiled_updates.append(fn)
        return lambda: updates.append(1) or compiled()

    monkeypatch.setattr(compiling, "compile_update", compile_update)
    config = LearnConfig(steps1=2, steps2=3, num_class_images=1, seed=3, tune="full", memory="fast")
    losses = losses_of_each_step(monkeypatch)
    learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name="plain", device="cpu")
    plain = list(losses)
    losses.clear()

    compile_from_now_on(monkeypatch)
    monkeypatch.setenv("SCENEBREAK_COMPILE_SCOPE", "whole")
    torch._dynamo.reset()
    try:
        learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name="whole", device="cpu")
        assert len(compiled_updates) == 2 and len(updates) == 5  # one per phase; every step used it
        assert len(plain) == len(losses) == 5
        # Phase 1 and phase 2's first step to fp32 rounding; then to bf16's where the CPU
        # autocasts (see the blocks test: the compiled backward rounds in another order).
        for i, (a, b) in enumerate(zip(plain, losses)):
            assert b == (pytest.approx(a, rel=1e-4, abs=1e-6) if i < 3 else pytest.approx(a, rel=1e-2, abs=1e-4))
        assert plain[3] != plain[2]  # the compiled update changed the weights phase 2 trains
        with pytest.raises(InvalidInput, match="SCENEBREAK_COMPILE_SCOPE=whole does not work here .--memory low"):
            learn(scene_files["image"], scene_files["masks"], dataclasses.replace(config, memory="low"),
                  base_model=str(tiny_model), name="whole-low", device="cpu")
    finally:
        torch._dynamo.reset()


def test_an_update_compiled_by_inductor_steps_fused_adamw_as_the_plain_one_does(tmp_path, monkeypatch):
    """compile_update with inductor's own code (here for the CPU): clipping and the fused
    AdamW's step over many tensors give the plain update's weights, step after step."""
    import copy

    from scenebreak.train.compiling import compile_update

    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch.manual_seed(0)
    plain = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(12)])
    compiled, start = copy.deepcopy(plain), copy.deepcopy(plain)
    models = [(plain, None), (compiled, None)]
    for i, (model, _) in enumerate(models):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2, fused=True)
        params = list(model.parameters())

        def update(params=params, optimizer=optimizer):
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            optimizer.step()

        models[i] = (model, (compile_update(update) if model is compiled else update, optimizer))
    torch._dynamo.reset()
    try:
        for _ in range(3):
            x = torch.randn(4, 16)
            for model, (update, optimizer) in models:
                model(x).square().mean().backward()
                update()
                optimizer.zero_grad(set_to_none=True)
    finally:
        torch._dynamo.reset()
    assert any(path.is_dir() for path in (tmp_path / "compile").glob("inductor*"))  # its cache is ours
    for a, b in zip(plain.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(a, b) for a, b in zip(compiled.parameters(), start.parameters()))  # every tensor stepped


def test_a_torch_without_compile_artifacts_compiles_each_run_instead_of_failing(monkeypatch, tmp_path):
    """torch before 2.7 has no save_cache_artifacts: the end of every --compile phase
    failed on it with an AttributeError."""
    from scenebreak.device import Device
    from scenebreak.train import compiling

    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "home"))
    monkeypatch.delattr(torch.compiler, "save_cache_artifacts")
    monkeypatch.delattr(torch.compiler, "load_cache_artifacts")
    key = compiling.compile_key(Device("cpu", "cpu"), {"test": 2})
    assert compiling.save_artifacts(key) is None and not compiling.load_artifacts(key)
