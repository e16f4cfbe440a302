"""The GPU code paths, checked on the CPU with the hardware mocked: cuda:N, precision
by capability, the 8-bit optimizer inside the backward pass, compile under
checkpointing, fp32 attention scores, the VAE overflow guard and MPS's failures."""

from __future__ import annotations

import types

import pytest
import torch

from scenebreak.device import Device, choose_device
from scenebreak.errors import is_out_of_memory
from scenebreak.errors import DeviceNotAvailable


@pytest.fixture
def two_gpus(monkeypatch):
    """torch believes it has two CUDA GPUs; records what is asked of them."""
    calls = {"set_device": [], "synchronize": [], "capability": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls["synchronize"].append(device))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: calls["capability"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 123 if device == torch.device("cuda:1") else 0)
    return calls


def test_cuda_n_is_chosen_made_current_and_used_for_sync_and_memory(two_gpus):
    device = choose_device("cuda:1")
    assert device.name == "cuda:1" and two_gpus["set_device"] == [1]
    device.synchronize()
    assert two_gpus["synchronize"] == [torch.device("cuda:1")]
    assert device.max_memory_allocated() == 123
    assert choose_device("cuda").name == "cuda:0"  # the current one, named
    with pytest.raises(DeviceNotAvailable, match="2 present"):
        choose_device("cuda:2")
    with pytest.raises(DeviceNotAvailable, match="only CUDA"):
        choose_device("cpu:1")


def test_the_command_line_takes_cuda_n():
    from click.testing import CliRunner

    from scenebreak.cli.commands import cli

    result = CliRunner().invoke(cli, ["generate", "no-such-scene", "<asset1>", "--device", "cuda:1"])
    assert result.exit_code == 2 and "scene not found" in result.stderr  # the option itself was accepted


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_bf16_only_where_the_gpu_runs_it_natively(two_gpus, capability, expected):
    two_gpus["capability"] = capability
    gpu = Device(type="cuda", name="cuda:1")
    assert gpu.train_dtype("auto") is expected
    assert gpu.train_dtype("fp16") is torch.float16 and gpu.train_dtype("bf16") is torch.bfloat16


def test_fp16_never_steps_inside_the_backward_pass(tiny_model, monkeypatch):
    from scenebreak import LearnConfig
    from scenebreak.train import memory
    from scenebreak.families.base_model import load_components

    monkeypatch.setattr(memory, "available_bytes", lambda device: 80 * 2**30)
    components, gpu = load_components(str(tiny_model)), Device(type="cuda", name="cuda:0")
    plan = memory.choose(LearnConfig(optimizer_in_backward=True), components, gpu, 64, torch.float16)
    assert not plan.optimizer_in_backward and any("loss scaler" in w for w in plan.warnings)
    assert memory.choose(LearnConfig(optimizer_in_backward=True), components, gpu, 64, torch.bfloat16).optimizer_in_backward


class FakeEightBit:
    """Looks like a bitsandbytes optimizer: step() would sync the whole GPU per tensor."""

    def __init__(self, groups):
        self.param_groups = [{**g, "params": list(g["params"])} for g in groups]
        self.state = {p: {} for g in self.param_groups for p in g["params"]}
        self.initialized = False
        self.updates = []

    def check_overrides(self):
        pass

    def to_gpu(self):
        pass

    def init_state(self, group, p, gindex, pindex):
        self.state[p]["step"] = 0

    def prefetch_state(self, p):
        pass

    def update_step(self, group, p, gindex, pindex):
        self.state[p]["step"] += 1
        p.sub_(group["lr"] * p.grad)
        self.updates.append(p)

    def step(self):
        raise AssertionError("step() synchronises the GPU after every tensor")

    def zero_grad(self, set_to_none=True):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None


FakeEightBit.__module__ = "bitsandbytes.optim.fake"


def test_eight_bit_in_the_backward_pass_updates_each_tensor_without_a_device_sync():
    from scenebreak.train.optim import OptimizerInBackward

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    made = []

    def make(groups):
        made.append(FakeEightBit(groups))
        return made[-1]

    opt = OptimizerInBackward([{"params": [a, b], "lr": 0.5}], make, max_norm=None)
    ((a * 2).sum() + (b * 3).sum()).backward()
    assert torch.allclose(a, torch.zeros(3)) and torch.allclose(b, torch.full((2,), -0.5))
    assert all(len(m.updates) == 1 and m.initialized for m in made) and a.grad is None and b.grad is None
    opt.close()


def test_compile_has_no_graph_break_from_the_capture_under_checkpointing(tiny_model):
    import torch._dynamo

    from scenebreak.families.unet import cross_attention_layers
    from scenebreak.train.attention import AttentionStore, capture_cross_attention
    from scenebreak.families.base_model import load_components
    from scenebreak.train.compiling import prepare_dynamo

    unet = load_components(str(tiny_model)).denoiser
    unet.train().requires_grad_(True)
    unet.enable_gradient_checkpointing()
    prepare_dynamo()  # the settings the trainer compiles with
    store = AttentionStore(0)
    inputs = (torch.randn(1, 4, 32, 32), torch.tensor([10]), torch.randn(1, 77, 32))
    try:
        with capture_cross_attention(unet, store, cross_attention_layers(unet)):
            explanation = torch._dynamo.explain(unet)(*inputs)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert store.maps  # the maps were recorded


def test_attention_scores_are_computed_in_fp32_under_half_precision():
    from diffusers.models.attention_processor import Attention

    from scenebreak.train.attention import AttentionStore, RecordingAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=8, heads=1, dim_head=8)
    with torch.no_grad():
        attn.to_q.weight.fill_(30.0)
        attn.to_k.weight.fill_(30.0)  # q.k = 8 * (30 * 8 * 1)^2, far beyond fp16's 65504; scaled by 1/sqrt(8) still large
    store = AttentionStore(0)
    processor = RecordingAttnProcessor(store, "x")
    hidden, context = torch.ones(1, 4, 8), torch.ones(1, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        processor(attn, hidden, context)
    probs = store.maps["x"]
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def test_a_half_precision_vae_that_overflows_is_decoded_again_in_fp32():
    from scenebreak.sample.pipeline import decode_latents

    class Vae(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.config = types.SimpleNamespace(scaling_factor=0.5)

        @property
        def dtype(self):
            return self.w.dtype

        def decode(self, latents):
            out = latents * self.w * 2
            if self.w.dtype == torch.float16:
                out = out * float("inf")  # overflows in half precision
            return types.SimpleNamespace(sample=out)

    vae = Vae().half()
    messages = []
    pixels = decode_latents(vae, torch.full((1, 4, 2, 2), 0.25), report=messages.append)
    assert torch.isfinite(pixels).all() and torch.allclose(pixels, torch.ones_like(pixels))
    assert vae.dtype == torch.float16 and "fp32" in messages[0].text
    from scenebreak.errors import SceneBreakError

    with pytest.raises(SceneBreakError, match=r"NaN or infinite .*: try --precision fp32$"):  # the UNet overflowed: no decode can fix that
        decode_latents(vae, torch.full((1, 4, 2, 2), float("nan")))


def test_mps_out_of_memory_and_memory_budget(monkeypatch):
    from scenebreak.train import memory

    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    # One tensor past the largest buffer Apple's GPU allows (8-16 GB Macs): memory too.
    assert is_out_of_memory(RuntimeError("Invalid buffer size: 11.25 GB"))
    # cuBLAS and cuDNN say a full card their own way.
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"))
    assert not is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED"))
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 20 * 2**30, raising=False)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 4 * 2**30, raising=False)
    monkeypatch.setattr("psutil.virtual_memory", lambda: types.SimpleNamespace(available=64 * 2**30))
    assert memory.available_bytes(Device(type="mps", name="mps")) == 16 * 2**30
    from scenebreak.cli.commands import describe

    message, code = describe(RuntimeError("MPS backend out of memory"))
    assert code == 1 and "out of memory" in message and "Traceback" not in message


def test_running_out_of_the_machines_memory_is_one_line_naming_the_fix(tiny_model, scene_files, monkeypatch):
    """torch's CPU allocator says it "can't allocate memory" (no "out of memory"), numpy
    raises MemoryError: both were a bare error line naming no fix."""
    from scenebreak.cli.commands import describe

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 1073741824000 bytes. Error code 12 (Cannot allocate memory)")
    for exc in (cpu, MemoryError("Unable to allocate 9.3 TiB for an array")):
        assert is_out_of_memory(exc)
        message, code = describe(exc)
        assert code == 1 and message.startswith("out of memory (RAM): try a smaller") and "--device cpu" not in message
    # learn on the CPU: the line names what helps there (not --device cpu)
    from scenebreak import LearnConfig, learn
    from scenebreak.errors import OutOfMemory
    from scenebreak.train import trainer

    def step(*args, **kwargs):
        raise cpu

    monkeypatch.setattr(trainer.Trainer, "run", step)
    with pytest.raises(OutOfMemory, match=r"out of memory on cpu: try --memory low \(with --resume to continue\)$"):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
              base_model=str(tiny_model), device="cpu")


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_frozen_weights_wait_in_half_precision_and_come_back_bit_for_bit(tiny_model, scene_files, tune):
    """On GPUs the weights that do not train live in the autocast precision (all of
    phase 1; the base under LoRA) with their fp32 values on the CPU: phase 2 of full
    tuning and the scene start from exactly the base model's weights. Run here on the
    CPU with bf16 autocast and the plan forced on."""
    from scenebreak.config import LearnConfig
    from scenebreak.images import prepare
    from scenebreak.train.memory import MemoryPlan
    from scenebreak.families.base_model import load_components
    from scenebreak.train.tokens import add_handles
    from scenebreak.train.trainer import Trainer, TrainInputs

    c = load_components(str(tiny_model))
    tokens = ["<asset1>", "<asset2>"]
    ids = add_handles(c.tokenizer, c.text_encoder, tokens)
    original = {k: v.clone() for k, v in {**c.denoiser.state_dict(), **c.text_encoder.state_dict()}.items()}
    vocabulary = c.text_encoder.get_input_embeddings().weight.detach().clone()
    prepared = prepare(scene_files["image"], scene_files["masks"], 64)
    inputs = TrainInputs(prepared.image, torch.from_numpy(prepared.masks), ids)
    plan = MemoryPlan("fast", False, False, False, False, tune=tune, half_frozen=True)
    config = LearnConfig(steps1=2, steps2=0 if tune == "full" else 1, prior=False, tune=tune, rank=2, standalone=tune == "lora")
    trainer = Trainer(c, inputs, config, choose_device("cpu"), tokens, plan=plan, amp_dtype=torch.bfloat16)
    seen = []
    for record in trainer.run():
        seen.append((record.phase, c.denoiser.conv_in.weight.dtype, trainer.embedding.handles.dtype, trainer.embedding.base.dtype))
        assert torch.isfinite(record.losses).all()
    assert all(w == torch.bfloat16 and h == torch.float32 and b == torch.bfloat16 for _, w, h, b in seen)
    if tune == "lora":
        assert all(p.dtype == torch.float32 for p in trainer.lora_params)
    # After the run: fp32 again, and every frozen weight exactly the base model's.
    assert c.denoiser.conv_in.weight.dtype == torch.float32 and trainer.embedding.base.dtype == torch.float32
    state = {**c.denoiser.state_dict(), **c.text_encoder.state_dict()}
    for key, value in original.items():
        if ".lora_" in key or "token_embedding" in key:
            continue
        if key not in state:  # a layer LoRA wraps: its own weight is now the base layer's
            parent, _, leaf = key.rpartition(".")
            key = f"{parent}.base_layer.{leaf}"
        assert torch.equal(state[key], value), key
    assert torch.equal(trainer.embedding.base, vocabulary[:-2])


def test_a_lora_scene_of_adapters_alone_keeps_only_the_vocabulary_in_fp32(tiny_model, scene_files):
    """Its base weights are never stored, so no fp32 copy of them waits on the CPU."""
    from scenebreak.config import LearnConfig
    from scenebreak.images import prepare
    from scenebreak.train.memory import MemoryPlan
    from scenebreak.families.base_model import load_components
    from scenebreak.train.tokens import add_handles
    from scenebreak.train.trainer import Trainer, TrainInputs

    c = load_components(str(tiny_model))
    ids = add_handles(c.tokenizer, c.text_encoder, ["<a>", "<b>"])
    vocabulary = c.text_encoder.get_input_embeddings().weight.detach().clone()
    prepared = prepare(scene_files["image"], scene_files["masks"], 64)
    plan = MemoryPlan("low", True, True, False, False, tune="lora", half_frozen=True)
    trainer = Trainer(c, TrainInputs(prepared.image, torch.from_numpy(prepared.masks), ids),
                      LearnConfig(steps1=1, steps2=1, prior=False, tune="lora", rank=2), choose_device("cpu"), ["<a>", "<b>"],
                      plan=plan, amp_dtype=torch.bfloat16)
    assert set(trainer._fp32_master) == {"vocabulary.0"}
    for _ in trainer.run():
        pass
    assert torch.equal(trainer.embedding.base, vocabulary[:-2]) and c.denoiser.conv_in.weight.dtype == torch.bfloat16


def test_phase_1_trains_the_handles_with_the_papers_adamw_under_adam_8bit(tiny_model, scene_files, monkeypatch):
    """--adam-8bit (and --memory low's choice of it) gave phase 1 bitsandbytes' AdamW too:
    the handles, placed at lr 5e-4, on quantised moments to save a few kilobytes."""
    import scenebreak.train.trainer as trainer_module
    from scenebreak.config import LearnConfig
    from scenebreak.families.base_model import load_components
    from scenebreak.images import prepare
    from scenebreak.train.memory import MemoryPlan
    from scenebreak.train.optim import adamw_factory
    from scenebreak.train.tokens import add_handles

    asked = []
    monkeypatch.setattr(trainer_module, "adamw_factory",
                        lambda config, device, eight_bit=False: (asked.append(eight_bit), adamw_factory(config, device))[1])
    c = load_components(str(tiny_model))
    ids = add_handles(c.tokenizer, c.text_encoder, ["<a>", "<b>"])
    prepared = prepare(scene_files["image"], scene_files["masks"], 64)
    trainer = trainer_module.Trainer(c, trainer_module.TrainInputs(prepared.image, torch.from_numpy(prepared.masks), ids),
                                     LearnConfig(steps1=1, steps2=1, prior=False), choose_device("cpu"), ["<a>", "<b>"],
                                     plan=MemoryPlan("low", False, False, True, False), amp_dtype=None)
    for _ in trainer.run():
        pass
    assert asked == [False, True]


@pytest.mark.parametrize("failure", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you "
                                                                     "tried to allocate 1000000 bytes")])
def test_the_machines_ram_running_out_during_gpu_training_is_not_called_the_gpus(failure):
    """The GPU hints (--memory low, --tune lora, --device cpu) do not help a host short of RAM."""
    from scenebreak.errors import OutOfMemory
    from scenebreak.train.learn import _out_of_memory_in_one_line
    from scenebreak.train.memory import MemoryPlan

    plan = MemoryPlan("fast", False, False, False, False)
    with pytest.raises(OutOfMemory, match=r"^the machine ran out of RAM \(not cuda:0, which had room\)"):
        with _out_of_memory_in_one_line(plan, Device(type="cuda", name="cuda:0")):
            raise failure
    with pytest.raises(OutOfMemory, match="^out of memory on cuda:0: try --memory low"):
        with _out_of_memory_in_one_line(plan, Device(type="cuda", name="cuda:0")):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(OutOfMemory, match="^out of memory on cpu: try --memory low"):
        with _out_of_memory_in_one_line(plan, Device(type="cpu", name="cpu")):
            raise failure


def test_lora_moves_its_frozen_base_to_the_device_already_in_half_precision(tiny_model, scene_files):
    """Moved in fp32 and cast there, the GPU held the whole base in fp32 first: the
    peak of a LoRA run (SDXL: 13 GB, where the plan counted 2 bytes a weight)."""
    from scenebreak.config import LearnConfig
    from scenebreak.images import prepare
    from scenebreak.train.memory import MemoryPlan
    from scenebreak.families.base_model import load_components
    from scenebreak.train.tokens import add_handles
    from scenebreak.train.trainer import Trainer, TrainInputs

    c = load_components(str(tiny_model))
    ids = add_handles(c.tokenizer, c.text_encoder, ["<a>", "<b>"])
    moved = {}
    for name, model in (("denoiser", c.denoiser), ("text encoder", c.text_encoder)):
        real_to = model.to
        model.to = lambda *args, name=name, model=model, real_to=real_to, **kwargs: (
            moved.setdefault(name, {p.dtype for n, p in model.named_parameters() if ".lora_" not in n}),
            real_to(*args, **kwargs))[1]
    prepared = prepare(scene_files["image"], scene_files["masks"], 64)
    plan = MemoryPlan("low", True, True, False, False, tune="lora", half_frozen=True)
    Trainer(c, TrainInputs(prepared.image, torch.from_numpy(prepared.masks), ids),
            LearnConfig(steps1=1, steps2=1, prior=False, tune="lora", rank=2), choose_device("cpu"), ["<a>", "<b>"],
            plan=plan, amp_dtype=torch.bfloat16)
    assert moved["denoiser"] == {torch.bfloat16}
    assert moved["text encoder"] == {torch.bfloat16, torch.float32}  # the handle rows train in fp32


def test_full_tuning_trains_phase_2_in_fp32_after_a_half_precision_phase_1(tiny_model, scene_files):
    from scenebreak.config import LearnConfig
    from scenebreak.images import prepare
    from scenebreak.train.memory import MemoryPlan
    from scenebreak.families.base_model import load_components
    from scenebreak.train.tokens import add_handles
    from scenebreak.train.trainer import Trainer, TrainInputs

    c = load_components(str(tiny_model))
    ids = add_handles(c.tokenizer, c.text_encoder, ["<a>", "<b>"])
    prepared = prepare(scene_files["image"], scene_files["masks"], 64)
    plan = MemoryPlan("fast", False, False, False, False, half_frozen=True)
    trainer = Trainer(c, TrainInputs(prepared.image, torch.from_numpy(prepared.masks), ids),
                      LearnConfig(steps1=1, steps2=2, prior=False, tune="full"), choose_device("cpu"), ["<a>", "<b>"],
                      plan=plan, amp_dtype=torch.bfloat16)
    dtypes = {record.phase: c.denoiser.conv_in.weight.dtype for record in trainer.run()}
    assert dtypes == {1: torch.bfloat16, 2: torch.float32}


def test_on_a_mac_the_gpu_cache_is_emptied_and_bitsandbytes_refused_up_front(monkeypatch, scene_files, tiny_model):
    """A smaller retry after running out of memory, and evaluate's scoring models after
    the diffusion ones, emptied only CUDA's cache; --quantize nf4 on MPS loaded the whole
    model before bitsandbytes failed there (it has no MPS kernels)."""
    from scenebreak.config import LearnConfig
    from scenebreak.kept import empty_gpu_cache
    from scenebreak.errors import InvalidInput
    from scenebreak.train.memory import choose_quantization

    emptied = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append("mps"))
    empty_gpu_cache()
    assert emptied == ["mps"]

    mps = Device(type="mps", name="mps")
    for kind in ("nf4", "int8"):
        with pytest.raises(InvalidInput, match=f"--quantize {kind}: bitsandbytes runs on CUDA and the CPU, not on MPS"):
            choose_quantization(LearnConfig(tune="lora", quantize=kind), None, mps, 512, True, True, [])
    assert choose_quantization(LearnConfig(tune="lora", quantize="auto"), None, mps, 512, True, True, []) == ("none", "")
    # learn itself refuses it before the base model loads (a Mac would move it to MPS first).
    import scenebreak.train.learn as learn_module

    monkeypatch.setattr(learn_module, "_learn", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(InvalidInput, match="--quantize nf4: bitsandbytes runs on CUDA and the CPU, not on MPS"):
        learn_module.learn(scene_files["image"], scene_files["masks"], LearnConfig(tune="lora", quantize="nf4"),
                           base_model=str(tiny_model), device=mps)
