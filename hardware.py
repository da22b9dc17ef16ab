"""What this machine computes fast: the one place that decides bfloat16 or float32, and how many threads to use.

  python hardware.py            # prints the decision and its reason, e.g. for a log
  python hardware.py --threads  # prints the cores this process may use (scripts size their thread counts by it)

bfloat16 pays only where the hardware multiplies it natively: a CUDA GPU that supports it, or a CPU with AMX or
AVX512-BF16 units (measured on such a CPU: a bf16 matrix product 4x faster than float32). Elsewhere torch
emulates it, and a bf16 matrix product runs 40x slower than float32 (AMD EPYC with AVX2 only: 1.3 against
55 GFLOP/s), so a bf16 default there stalls fine-tuning and embedding. The fine-tuning trainer, the retriever's
embeddings, chat.py's in-process model, the benchmarks and the demo all ask `compute_dtype` here.

A CPU whose oneDNN is capped below AVX512_CORE_BF16 (ONEDNN_MAX_CPU_ISA=AVX2, say) counts as having no bf16
units: oneDNN then emulates bf16 exactly as on such a CPU. That cap, with ATEN_CPU_CAPABILITY=avx2, is how the
README's figures for CPUs without bf16 units were measured on a CPU that has them.
"""
import os
import sys
from pathlib import Path
from typing import Optional

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")          # /proc/cpuinfo flags of native bf16 matrix units
# oneDNN's ISA levels (ONEDNN_MAX_CPU_ISA) that include its bf16 kernels; lower ones emulate bf16.
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                    "ALL", "DEFAULT")
CHOICES = ("auto", "bfloat16", "float32")


def read_cpuinfo() -> str:
    """/proc/cpuinfo (Linux); empty where it cannot be read, which counts as a CPU without bf16 units."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: Optional[str] = None) -> set[str]:
    """The CPU's feature flags, from cpuinfo text (default: this machine's)."""
    for line in (read_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_bf16(cpuinfo: Optional[str] = None, environ: Optional[dict] = None) -> tuple[bool, str]:
    """(native bf16 on this CPU, why), from its flags and any cap on oneDNN's instruction set."""
    environ = os.environ if environ is None else environ
    units = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags(cpuinfo)]
    if not units:
        return False, "the CPU has no bf16 units (no AMX, no AVX512-BF16)"
    cap = environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and cap not in ONEDNN_BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN off the CPU's bf16 units"
    return True, f"the CPU has bf16 units ({', '.join(units)})"


def bf16_native(device: str = "auto", cpuinfo: Optional[str] = None, environ: Optional[dict] = None) -> tuple[bool, str]:
    """(bf16 is fast here, why) for device 'cuda', 'cpu' or 'auto' (the GPU when there is one)."""
    import torch
    if device in ("auto", "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return True, f"the GPU ({name}) supports bf16"
        return False, f"the GPU ({name}) has no bf16 support"
    return cpu_bf16(cpuinfo, environ)


def compute_dtype(choice: str = "auto", device: str = "auto", cpuinfo: Optional[str] = None,
                  environ: Optional[dict] = None) -> tuple[str, str]:
    """('bfloat16' or 'float32', why) for a setting of auto, bfloat16 or float32: auto takes bf16 only where it
    is native; an explicit choice is kept, with a warning in the reason when bf16 is asked for where it is slow."""
    if choice not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}, got {choice!r}")
    native, why = bf16_native(device, cpuinfo, environ)
    if choice == "float32":
        return "float32", "float32 asked for"
    if choice == "bfloat16":
        return "bfloat16", "bfloat16 asked for" + ("" if native else f" although {why}: expect it to be slow")
    return ("bfloat16" if native else "float32"), f"auto: {why}"


def torch_dtype(name: str):
    import torch
    return getattr(torch, name)


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may run on, at least 1: its CPU affinity (taskset, cpusets), capped by a container's CPU
    quota (docker --cpus, Kubernetes CPU limits), which leaves the affinity at every core of the host."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:          # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, quota) if quota else cores)


def cgroup_cpu_quota(root: Path) -> Optional[int]:
    """Whole cores the CPU quota of this process's cgroup allows (rounded down: threads beyond the quota are
    throttled), or None without a quota. cgroup v2 (cpu.max: "QUOTA PERIOD" or "max PERIOD"), then v1."""
    candidates = [(root / cgroup_path() / "cpu.max", None), (root / "cpu.max", None),
                  (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us")]
    for first, period_file in candidates:
        try:
            fields = first.read_text().split()
            quota, period = (fields[0], period_file.read_text().split()[0]) if period_file else fields[:2]
            if quota in ("max", "-1"):
                return None
            return max(1, int(quota) // int(period))
        except (OSError, ValueError, IndexError):
            continue
    return None


def cgroup_path() -> str:
    """This process's cgroup v2 path (relative), from /proc/self/cgroup's "0::/path" line; "" if unknown."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:].lstrip("/")
    except OSError:
        pass
    return ""


def threads_per_process(processes: int) -> int:
    """Threads for each of `processes` processes sharing this machine's cores: more would oversubscribe them."""
    return max(1, usable_cores() // max(1, processes))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--threads"]:
        print(usable_cores())
        return 0
    if argv:
        print("usage: python hardware.py [--threads]", file=sys.stderr)
        return 2
    dtype, why = compute_dtype()
    print(f"{dtype} ({why}); {usable_cores()} usable core(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
