"""Device/dtype handling: one place picks the device (nanoseek.device), no other source file hard-codes one, and
`--device`/`--dtype` of every model-loading command reach the stage's config and the model loader."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import nanoseek
from nanoseek import device as nd
from nanoseek.cli import main

from .hf_ref import make_tiny_model_dir

PACKAGE = Path(nanoseek.__file__).parent

# ------------------------------------------------------------------------------------------------------------
# the source scan

DEVICE_NAMES = ("cpu", "cuda", "mps")
# the one function allowed to name a device: it picks the default
ALLOWED_FUNCTIONS = {("device.py", "default_device")}
# .cpu() is for data leaving for the host; every site is reviewed and listed with its reason
ALLOWED_CPU_CALLS = {
    ("checkpoint.py", "_flatten_named"): "optimizer state -> safetensors file",
    ("weights.py", "save_pretrained"): "model weights -> safetensors file",
    ("imagine.py", "save_janus"): "Janus weights -> safetensors file",
    ("imagine.py", "to_pil"): "decoded pixels -> numpy -> PIL images",
    ("imagine.py", "write_janus"): "Janus weights -> safetensors file",
    ("imagine.py", "write_vq"): "VQ weights -> safetensors file",
    ("export.py", "gguf_tensors"): "model weights -> GGUF file (one tensor at a time)",
    ("janus_train.py", "vq_tokens"): "the frozen VQ's token ids, computed once per run, kept as the host dataset",
    ("minijanus.py", "train_vq"): "code ids -> the host table of each code's last use (dead-code restarts)",
}
# files are read into host memory, then copied into the model on its device (as safetensors files are)
ALLOWED_HOST_READS = {
    ("weights.py", "_read_bin"): "torch.load(map_location='cpu') of a pytorch_model.bin",
    ("export.py", "export_gguf"): "the model is read to host memory to be written as a GGUF file",
    ("janus_train.py", "load_vq"): "the trained VQ read to the host; its weights are copied into the Janus",
    ("minijanus.py", "_load_vq_into"): "a VQ checkpoint read to the host, copied into the VQ on its device",
}
# torch.Generator() without a device is a host generator; allowed where the draws are host-side on purpose
ALLOWED_HOST_GENERATORS = {
    ("rl.py", "rl"): "mini-batch permutation of Python lists: identical on every device",
    ("minijanus.py", "restart_dead_codes"): "which encoder outputs replace dead codes: host draws, device-independent",
}


def _is_device_literal(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return False
    kind, _, index = node.value.partition(":")
    return kind in DEVICE_NAMES and (not index or index.isdigit())


def scan_source(source: str, name: str) -> list[str]:
    """Device *construction* defaults in one file: a device name ("cpu", "cuda", "mps", "cpu:0", ...) used as a
    value (device="cpu", torch.device("cpu"), autocast("cpu"), device_type="cpu", `device or "cpu"`, a parameter
    or field default, .to("cpu")), a .cpu() call, or a device-less torch.Generator(), outside the allow-lists.
    Comparisons (`x.device.type == "cpu"`: dispatch), dict keys and subscripts (report fields) are fine."""
    tree = ast.parse(source)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def function_of(node: ast.AST) -> str | None:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return node.name
        return None

    def allowed_context(node: ast.AST) -> bool:
        parent = parents.get(node)
        while isinstance(parent, ast.Tuple | ast.List | ast.Set):  # x in ("cpu", "meta")
            node, parent = parent, parents.get(parent)
        if isinstance(parent, ast.Compare):
            return True
        if isinstance(parent, ast.Dict) and node in parent.keys:
            return True
        return isinstance(parent, ast.Subscript) and node is parent.slice

    found = []
    for node in ast.walk(tree):
        fn = function_of(node)
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if _is_device_literal(node) and not allowed_context(node) and (name, fn) not in ALLOWED_FUNCTIONS \
                and (name, fn) not in ALLOWED_HOST_READS:
            found.append(f"{where}: device literal {node.value!r}")  # type: ignore[attr-defined]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "cpu" and not node.args and (name, fn) not in ALLOWED_CPU_CALLS:
                found.append(f"{where}: .cpu() (allowed only where data leaves for the host; review and list it)")
            if (node.func.attr == "Generator" and not node.args and not node.keywords
                    and (name, fn) not in ALLOWED_HOST_GENERATORS):
                found.append(f"{where}: torch.Generator() without a device (a host generator)")
    return found


def scan_package() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += scan_source(path.read_text(encoding="utf-8"), path.relative_to(PACKAGE).as_posix())
    return found


def test_no_hard_coded_device_in_the_package():
    assert scan_package() == []


@pytest.mark.parametrize("snippet", [
    'm = load(path, device="cpu")',
    "m = load(path, device='cpu')",
    'd = torch.device("cpu")',
    'd = torch.device("cuda:0")',
    'ctx = torch.autocast("cpu", dtype=torch.bfloat16)',
    'ctx = torch.autocast(device_type="cpu")',
    'x = torch.zeros(3, device=device or "cpu")',
    'def f(device: str = "cpu"):\n    pass',
    'class C:\n    device: str = "cpu"',
    'y = x.to("cpu")',
    "y = x.detach().cpu()",
    "g = torch.Generator()",
    'g = torch.Generator("cpu")',
    "def default_device():\n    return torch.device('cpu')",  # allowed only in nanoseek/device.py
])
def test_the_scan_catches(snippet):
    assert len(scan_source(snippet, "x.py")) == 1


@pytest.mark.parametrize("snippet", [
    'fast = x.device.type == "cpu"',
    'ok = dev.type not in ("cpu", "meta")',
    'env = {"cpu": name}',
    'print(env["cpu"])',
    'help = "cpu | cuda"',
    "g = torch.Generator(x.device)",
    "y = x.to(model.device)",
    "def default_device():\n    return torch.device('cpu')",
])
def test_the_scan_allows(snippet):
    name = "device.py" if "default_device" in snippet else "x.py"
    assert scan_source(snippet, name) == []


def test_the_scan_allow_lists_name_existing_functions():
    """A stale allow-list entry would quietly allow a new violation elsewhere under the same name."""
    for file, fn in [*ALLOWED_FUNCTIONS, *ALLOWED_CPU_CALLS, *ALLOWED_HOST_GENERATORS, *ALLOWED_HOST_READS]:
        tree = ast.parse((PACKAGE / file).read_text(encoding="utf-8"))
        assert fn in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, (file, fn)


# ------------------------------------------------------------------------------------------------------------
# nanoseek.device


def test_default_device_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert nd.default_device() == torch.device("cpu") == nd.resolve_device(None) == nd.resolve_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert nd.default_device().type == "cuda"


def test_resolve_device_errors_are_one_clear_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda' is not available.*use --device cpu"):
        nd.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        nd.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="1 CUDA device"):
        nd.resolve_device("cuda:1")
    assert nd.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert nd.resolve_device("meta").type == "meta"  # passes through: the loaders reject it


def test_dtype_names_and_auto(monkeypatch):
    assert [nd.dtype_name(n) for n in ("fp32", "bf16", "fp16", "float32", "auto")] == [
        "float32", "bfloat16", "float16", "float32", "auto"]
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        nd.dtype_name("fp8")
    with pytest.raises(ValueError, match="inference only"):
        nd.dtype_name("fp16", training=True)
    cpu = torch.device("cpu")
    assert nd.resolve_dtype("auto", cpu) == torch.float32
    assert nd.resolve_dtype("bf16", cpu) == torch.bfloat16 and nd.resolve_dtype("float16", "cpu") == torch.float16
    monkeypatch.setattr(nd, "_cuda_native_bf16", lambda: True)
    assert nd.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert nd.resolve_dtype("fp32", "cuda") == torch.float32
    monkeypatch.setattr(nd, "_cuda_native_bf16", lambda: False)
    assert nd.resolve_dtype("auto", "cuda:0") == torch.float32  # emulated bf16 is slow; fp16 needs loss scaling
    assert nd.resolve_dtype("auto", "mps") == torch.float32
    # the AMX rule of train.py (measured): only for callers that pass the hidden size
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert nd.resolve_dtype("auto", cpu, amx_hidden_size=512) == torch.bfloat16
    assert nd.resolve_dtype("auto", cpu, amx_hidden_size=256) == torch.float32
    assert nd.resolve_dtype("auto", cpu) == torch.float32  # inference and RL: fp32 on a CPU


def test_autocast_factory():
    cpu = torch.device("cpu")
    with nd.autocast(cpu, torch.float32)():
        assert not torch.is_autocast_enabled("cpu")
    with nd.autocast(cpu, torch.bfloat16)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# ------------------------------------------------------------------------------------------------------------
# --device / --dtype through every command's argument parsing into the stage config


class Captured(Exception):  # noqa: N818 - a control-flow signal, not an error
    def __init__(self, value: Any) -> None:
        super().__init__("captured")
        self.value = value


def _capture(monkeypatch, module: Any, name: str) -> None:
    def fake(*args: Any, **kwargs: Any) -> Any:
        raise Captured(args[0] if args and not kwargs else {"args": args, **kwargs})

    monkeypatch.setattr(module, name, fake)


def _model_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Model arguments must name a directory (or a Hub id): the stages are captured, so empty ones do."""
    monkeypatch.chdir(tmp_path)
    for name in ("m", "t", "s"):
        (tmp_path / name).mkdir(exist_ok=True)


def _run(argv: list[str]) -> Any:
    with pytest.raises(Captured) as e:
        main(argv)
    return e.value.value


DEV = ["--device", "cpu", "--dtype", "bf16"]


def test_train_rl_kd_sft_configs_carry_device_and_dtype(monkeypatch, tmp_path):
    import nanoseek.distill
    import nanoseek.rl
    import nanoseek.train

    _capture(monkeypatch, nanoseek.train, "train")
    cfg = _run(["train", "--preset", "tiny", "--out", str(tmp_path / "t"), *DEV])
    assert (cfg.device, cfg.dtype) == ("cpu", "bf16")
    cfg = _run(["train", "--preset", "tiny", "--device", "cpu", "dtype=fp32"])  # key=value wins, as for other keys
    assert (cfg.device, cfg.dtype) == ("cpu", "fp32")
    assert _run(["train", "--preset", "tiny"]).device is None  # None: nanoseek.device.default_device()

    _model_dirs(monkeypatch, tmp_path)
    _capture(monkeypatch, nanoseek.rl, "rl")
    cfg = _run(["rl", "--model", "m", *DEV])
    assert (cfg.device, cfg.dtype) == ("cpu", "bf16")
    assert _run(["rl", "--model", "m"]).dtype == "auto"

    _capture(monkeypatch, nanoseek.distill, "kd")
    cfg = _run(["distill", "kd", "--teacher", "t", "--student", "s", "--out", "o", "--data", "d", *DEV])
    assert (cfg.device, cfg.dtype) == ("cpu", "bf16")

    _capture(monkeypatch, nanoseek.distill, "sft")
    cfg = _run(["distill", "sft", "--preset", "tiny", "--traces", "t", "--out", "o", *DEV])
    assert (cfg.device, cfg.dtype) == ("cpu", "bf16")

    _capture(monkeypatch, nanoseek.distill, "generate")
    cfg = _run(["distill", "generate", "--teacher", "t", "--out", "o", *DEV])
    assert (cfg.device, cfg.dtype) == ("cpu", "bf16")


def test_inference_commands_carry_device_and_dtype(monkeypatch, tmp_path):
    _model_dirs(monkeypatch, tmp_path)
    import nanoseek.chat
    import nanoseek.demo
    import nanoseek.eval
    import nanoseek.generate
    import nanoseek.serve

    _capture(monkeypatch, nanoseek.eval, "evaluate")
    cfg = _run(["eval", "--model", "m", *DEV])
    assert (cfg.device, cfg.dtype) == ("cpu", "bf16")

    _capture(monkeypatch, nanoseek.generate, "run_generate")
    kw = _run(["generate", "--model", "m", "--prompt-ids", "1", *DEV])
    assert (kw["device"], kw["dtype"]) == ("cpu", "bf16")
    assert _run(["generate", "--model", "m", "--prompt-ids", "1"])["dtype"] == "auto"

    _capture(monkeypatch, nanoseek.serve, "serve")
    cfg = _run(["serve", "--model", "m", *DEV])
    assert (cfg.device, cfg.dtype) == ("cpu", "bf16")

    _capture(monkeypatch, nanoseek.chat, "run_chat")
    kw = _run(["chat", "--model", "m", *DEV])
    assert (kw["device"], kw["dtype"]) == ("cpu", "bf16")

    _capture(monkeypatch, nanoseek.demo, "run_demo")
    kw = _run(["demo", "--fast", *DEV])
    assert (kw["device"], kw["dtype"]) == ("cpu", "bf16")


def test_sft_passes_device_and_dtype_to_the_trainer(monkeypatch, tmp_path):
    import nanoseek.train
    from nanoseek.distill import SFTConfig, sft
    from nanoseek.tasks import synth

    model = make_tiny_model_dir(tmp_path)
    synth("arithmetic", 8, "train", 0, tmp_path / "chat.jsonl", "chat")
    _capture(monkeypatch, nanoseek.train, "train")
    with pytest.raises(Captured) as e:
        sft(SFTConfig(traces=str(tmp_path / "chat.jsonl"), out=str(tmp_path / "o"), student=str(model),
                      device="cpu", dtype="bf16"))
    assert (e.value.value.device, e.value.value.dtype) == ("cpu", "bf16")
    with pytest.raises(Captured) as e:  # an explicit dtype=... override wins over --dtype
        sft(SFTConfig(traces=str(tmp_path / "chat.jsonl"), out=str(tmp_path / "o"), student=str(model),
                      device="cpu", dtype="bf16", overrides=["dtype=fp32"]))
    assert e.value.value.dtype == "fp32"


def test_demo_stages_get_the_plan_device_and_dtype(monkeypatch, tmp_path):
    from rich.console import Console

    import nanoseek.distill
    import nanoseek.eval
    import nanoseek.rl
    import nanoseek.train
    from nanoseek import demo
    from nanoseek.experiment import StageRun

    plan = demo.DemoPlan.make(fast=True)
    plan.device, plan.dtype = "cpu", "bf16"
    (tmp_path / "models").mkdir()
    make_tiny_model_dir(tmp_path / "models", name="student-base")
    (tmp_path / "models" / "base").mkdir()
    run = StageRun(root=tmp_path, console=Console(quiet=True), results={
        "traces": {"accepted": 1000, "teacher_sampling_flops": 0.0}, "student_rl": {"flops": 1e12}})
    for module, name, stage in ((nanoseek.train, "train", demo.stage_pretrain),
                                (nanoseek.train, "train", demo.stage_student_pretrain),
                                (nanoseek.rl, "rl", demo.stage_rl), (nanoseek.rl, "rl", demo.stage_student_rl),
                                (nanoseek.distill, "generate", demo.stage_traces),
                                (nanoseek.distill, "sft", demo.stage_student_distill),
                                (nanoseek.eval, "evaluate", demo.stage_eval)):
        _capture(monkeypatch, module, name)
        with pytest.raises(Captured) as e:
            stage(run, plan)
        cfg = e.value.value["args"][0] if isinstance(e.value.value, dict) else e.value.value  # train(cfg, clock=)
        assert (cfg.device, cfg.dtype) == ("cpu", "bf16"), (name, stage.__name__)


# ------------------------------------------------------------------------------------------------------------
# real (tiny) runs: the device reaches the loader, bad values are one error line


def _one_error(capsys) -> str:
    """stderr of a failed command: one "error:" message (rich wraps it at the terminal width), no traceback."""
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    return " ".join(err.split())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("device"))


def test_generate_eval_serve_chat_load_on_the_device_in_the_dtype(tiny, tmp_path, capsys):
    from nanoseek.chat import LocalBackend
    from nanoseek.serve import ServeConfig, Server

    assert main(["generate", "--model", str(tiny), "--prompt-ids", "1,2,3", "--max-tokens", "3", "--temperature",
                 "0", "--device", "cpu", "--dtype", "bf16"]) == 0
    assert "3 tokens" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny), "--n", "2", "--k", "1", "--max-tokens", "4", "--device", "cpu",
                 "--dtype", "fp32", "--out", str(tmp_path / "ev")]) == 0
    config = json.loads((tmp_path / "ev" / "summary.json").read_text())["config"]
    assert (config["device"], config["dtype"]) == ("cpu", "fp32")
    engine = Server.from_config(ServeConfig(model=str(tiny), device="cpu", dtype="bfloat16")).engine
    assert (engine.device.type, engine.dtype, engine.generator.device.type) == ("cpu", torch.bfloat16, "cpu")
    engine = LocalBackend(tiny, device="cpu", dtype="fp32").engine
    assert (engine.device.type, engine.dtype) == ("cpu", torch.float32)


def test_rl_runs_with_device_and_bf16_autocast(tiny, tmp_path):
    from nanoseek.rl import RLConfig, rl

    s = rl(RLConfig(model=str(tiny), out=str(tmp_path), steps=1, group_size=2, batch_prompts=1, max_new_tokens=4,
                    eval_n=0, save_every=0, sample_every=0, progress=False, device="cpu", dtype="bf16"))
    assert s["steps"] == 1
    saved = json.loads((tmp_path / "rl_config.json").read_text())
    assert (saved["device"], saved["dtype"]) == ("cpu", "bf16")


def test_meta_device_reaches_the_loader(tiny, tmp_path, capsys):
    """--device meta is not rejected by the parser or the config: the loaders see it and refuse it clearly."""
    assert main(["generate", "--model", str(tiny), "--prompt-ids", "1", "--device", "meta"]) == 2
    err = _one_error(capsys)
    assert "meta device" in err
    assert main(["distill", "kd", "--teacher", str(tiny), "--student", str(tiny), "--out", str(tmp_path / "kd"),
                 "--data", str(tmp_path), "--device", "meta"]) == 2
    assert "meta device" in _one_error(capsys)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "t"), "--device", "meta"]) == 2
    assert "meta device" in _one_error(capsys)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt-ids", "1", "--device", "cuda"], "'cuda' is not available"),
    (["generate", "--prompt-ids", "1", "--device", "gpu"], "unknown device 'gpu'"),
    (["generate", "--prompt-ids", "1", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["serve", "--dtype", "int4"], "unknown dtype 'int4'"),
    (["eval", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["chat", "--device", "cuda"], "'cuda' is not available"),
    (["rl", "--dtype", "fp16"], "inference only"),
    (["distill", "kd", "--teacher", "{m}", "--student", "{m}", "--out", "{o}", "--data", "d", "--dtype", "x"],
     "unknown dtype 'x'"),
    (["demo", "--out", "{o}", "--device", "cuda"], "'cuda' is not available"),
])
def test_bad_device_or_dtype_is_one_error_line(tiny, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [a.format(m=tiny, o=tmp_path / "o") for a in argv]
    if argv[0] in ("generate", "serve", "eval", "chat", "rl"):
        argv[1:1] = ["--model", str(tiny)]
    assert main(argv) == 2
    assert message in _one_error(capsys)
