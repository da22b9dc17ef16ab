"""hardware.py: bf16 only where the hardware multiplies it natively, decided once for every part of the toolkit."""
import subprocess
import sys

import pytest

import hardware
from finetune.finetuning import choose_precision, parse_args
from tests.conftest import ROOT

AMX_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ZEN4_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
AVX2_CPU = "processor\t: 0\nflags\t\t: fpu sse2 fma avx avx2 f16c\n"


@pytest.fixture
def no_gpu(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("cpuinfo, native", [(AMX_CPU, True), (ZEN4_CPU, True), (AVX2_CPU, False), ("", False)])
def test_auto_takes_bf16_only_on_a_cpu_with_bf16_units(no_gpu, cpuinfo, native):
    dtype, why = hardware.compute_dtype("auto", cpuinfo=cpuinfo, environ={})
    assert dtype == ("bfloat16" if native else "float32")
    assert why.startswith("auto: ") and ("has bf16 units" in why) == native


def test_a_onednn_cap_below_bf16_counts_as_no_bf16_units(no_gpu):
    assert hardware.compute_dtype("auto", cpuinfo=AMX_CPU, environ={"ONEDNN_MAX_CPU_ISA": "AVX2"}) == \
        ("float32", "auto: ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN off the CPU's bf16 units")
    assert hardware.compute_dtype("auto", cpuinfo=AMX_CPU, environ={"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"})[0] == \
        "bfloat16"


def test_an_explicit_choice_is_kept_with_a_warning_where_bf16_is_slow(no_gpu):
    dtype, why = hardware.compute_dtype("bfloat16", cpuinfo=AVX2_CPU, environ={})
    assert dtype == "bfloat16" and "expect it to be slow" in why
    assert hardware.compute_dtype("float32", cpuinfo=AMX_CPU, environ={}) == ("float32", "float32 asked for")
    with pytest.raises(ValueError, match="auto, bfloat16, float32"):
        hardware.compute_dtype("fp16")


def test_a_gpu_decides_by_its_own_bf16_support(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hardware.compute_dtype("auto", cpuinfo=AMX_CPU, environ={}) == \
        ("float32", "auto: the GPU (Tesla V100) has no bf16 support")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.compute_dtype("auto", cpuinfo=AVX2_CPU, environ={})[0] == "bfloat16"
    # A CPU-only decision ignores the GPU.
    assert hardware.compute_dtype("auto", device="cpu", cpuinfo=AVX2_CPU, environ={})[0] == "float32"


def test_the_trainer_flag_follows_the_same_rule(no_gpu, monkeypatch):
    import torch
    cpu = torch.device("cpu")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    for cpuinfo, expected in ((AVX2_CPU, "float32"), (ZEN4_CPU, "bfloat16")):
        monkeypatch.setattr(hardware, "read_cpuinfo", lambda text=cpuinfo: text)
        args = parse_args(["--model_name", "m", "--data_path", "d"])
        assert args.mixed_precision == "auto"
        dtype, line = choose_precision(args, cpu)
        assert dtype == expected and "--mixed_precision auto:" in line
    args = parse_args(["--model_name", "m", "--data_path", "d", "--mixed_precision", "False"])
    assert choose_precision(args, cpu) == ("float32", "float32 compute and weights (--mixed_precision float32 asked for)")
    args = parse_args(["--model_name", "m", "--data_path", "d", "--mixed_precision", "true"])
    assert choose_precision(args, cpu)[0] == "bfloat16"


def test_threads_share_the_usable_cores(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(hardware, "cgroup_cpu_quota", lambda root: None)
    assert hardware.usable_cores() == 8
    assert hardware.threads_per_process(2) == 4 and hardware.threads_per_process(16) == 1


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "max 100000\n"}, 8),                                    # cgroup v2, no quota
    ({"cpu.max": "250000 100000\n"}, 2),                                 # docker --cpus 2.5: 2 whole cores
    ({"cpu.max": "50000 100000\n"}, 1),                                  # half a core: still 1
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),   # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8),       # v1, no quota
    ({}, 8),                                                              # no cgroup files at all
])
def test_a_container_cpu_quota_caps_the_cores(monkeypatch, tmp_path, files, cores):
    """A container limited by quota still sees every host core in its affinity: 64 threads on a 2-CPU quota
    would be throttled most of the time."""
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(hardware, "cgroup_path", lambda: "")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert hardware.usable_cores(tmp_path) == cores


def test_the_command_line_prints_the_decision():
    done = subprocess.run([sys.executable, str(ROOT / "hardware.py")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(("bfloat16 (auto: ", "float32 (auto: "))
    capped = subprocess.run([sys.executable, str(ROOT / "hardware.py")], capture_output=True, text=True,
                            env={"ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": ""})
    assert capped.stdout.startswith("float32 (auto: ")
    threads = subprocess.run([sys.executable, str(ROOT / "hardware.py"), "--threads"], capture_output=True, text=True)
    assert int(threads.stdout) >= 1
