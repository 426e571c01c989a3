"""The GPU check's pure parts, on fakes: nvidia-smi's CSV, the tolerance comparison and the
percentile. They run everywhere; the check itself needs a GPU (test_on_gpu.py)."""

from __future__ import annotations

import pytest

from exporter.system.gpu import GpuProcess, GpuReading
from tests.gpu.compare import (
    MIB,
    SMI_APP_FIELDS,
    SMI_GPU_FIELDS,
    Tolerance,
    compare,
    parse_smi_csv,
    percentile,
)

# What nvidia-smi 550 prints for --query-gpu=<SMI_GPU_FIELDS> --format=csv,noheader,nounits
# on a node with an H100 and an L4 whose power reading is not supported.
SMI_GPUS = """\
0, GPU-8f3a1b2c-0000-1111-2222-333344445555, 7210, 81559, 93, 61, 412.53
1, GPU-1c2d3e4f-6666-7777-8888-999900001111, 3, 23034, 0, 34, [N/A]
"""
SMI_APPS = "GPU-8f3a1b2c-0000-1111-2222-333344445555, 4242, 7168\n"


def reading(**changes: object) -> GpuReading:
    base = {"index": 0, "uuid": "GPU-8f3a1b2c-0000-1111-2222-333344445555", "name": "H100",
            "memory_used_bytes": 7210 * MIB, "memory_total_bytes": 81559 * MIB,
            "utilization_ratio": 0.93, "temperature_celsius": 61.0, "power_watts": 412.53,
            "processes": (GpuProcess(4242, "python3", 7168 * MIB),)}
    return GpuReading(**{**base, **changes})  # type: ignore[arg-type]


def other_gpu() -> GpuReading:
    return GpuReading(1, "GPU-1c2d3e4f-6666-7777-8888-999900001111", "L4", 3 * MIB,
                      23034 * MIB, 0.0, 34.0, None)


def smi() -> tuple[list[dict], list[dict]]:
    return parse_smi_csv(SMI_GPUS, SMI_GPU_FIELDS), parse_smi_csv(SMI_APPS, SMI_APP_FIELDS)


def test_nvidia_smi_csv_parses_numbers_text_and_not_available() -> None:
    gpus, apps = smi()
    assert gpus[0]["memory.used"] == 7210.0
    assert gpus[0]["power.draw"] == 412.53
    assert gpus[0]["uuid"] == "GPU-8f3a1b2c-0000-1111-2222-333344445555"
    assert gpus[1]["power.draw"] is None
    assert apps == [{"gpu_uuid": "GPU-8f3a1b2c-0000-1111-2222-333344445555", "pid": 4242.0,
                     "used_memory": 7168.0}]
    assert parse_smi_csv("\n\n", SMI_APP_FIELDS) == []


def test_nvidia_smi_csv_with_the_wrong_field_count_is_an_error_naming_the_line() -> None:
    with pytest.raises(ValueError, match="line 2: expected 3 fields"):
        parse_smi_csv("GPU-a, 1, 2\nGPU-a, 1\n", SMI_APP_FIELDS)


def test_readings_that_match_within_tolerance_agree() -> None:
    gpus, apps = smi()
    moved = reading(memory_used_bytes=7210 * MIB + 40 * MIB, utilization_ratio=0.80,
                    temperature_celsius=63.0, power_watts=390.0)
    assert compare([moved, other_gpu()], gpus, apps) == []


@pytest.mark.parametrize(("change", "field"), [
    ({"memory_used_bytes": 7210 * MIB + 65 * MIB}, "memory_used_bytes"),
    ({"utilization_ratio": 0.5}, "utilization_ratio"),
    ({"temperature_celsius": 70.0}, "temperature_celsius"),
    ({"power_watts": 200.0}, "power_watts"),
    ({"power_watts": None}, "power_watts"),  # one side reports it, the other not
    ({"processes": ()}, "process 4242 memory_bytes"),
    ({"processes": (GpuProcess(4242, "python3", 5000 * MIB),)}, "process 4242 memory_bytes"),
])
def test_a_reading_beyond_tolerance_is_a_disagreement_naming_the_field(
        change: dict, field: str) -> None:
    gpus, apps = smi()
    (found,) = compare([reading(**change), other_gpu()], gpus, apps)
    assert (found.gpu, found.field) == ("0", field)


def test_a_gpu_only_one_side_sees_is_a_disagreement() -> None:
    gpus, apps = smi()
    found = compare([reading()], gpus, apps)
    assert [(d.field, d.nvidia_smi) for d in found] == \
        [("present", "GPU-1c2d3e4f-6666-7777-8888-999900001111")]
    extra = GpuReading(2, "GPU-ffff", "x", 1, 2)
    assert [d.field for d in compare([reading(), other_gpu(), extra], gpus, apps)] == \
        ["present"]


def test_power_tolerance_is_relative_for_a_big_draw() -> None:
    gpus, apps = smi()
    allowed = Tolerance().power_ratio * 412.53
    assert compare([reading(power_watts=412.53 - allowed + 1), other_gpu()], gpus, apps) == []
    assert compare([reading(power_watts=412.53 - allowed - 1), other_gpu()], gpus, apps)


def test_percentile_interpolates_between_ranks() -> None:
    values = [0.1 * i for i in range(1, 11)]  # 0.1 .. 1.0
    assert percentile(values, 0.5) == pytest.approx(0.55)
    assert percentile(values, 0.99) == pytest.approx(0.991)
    assert percentile([0.2], 0.99) == 0.2


@pytest.mark.slow
@pytest.mark.chattts
def test_the_batching_section_reads_the_benchmarks_report() -> None:
    """Step 5 of the check runs bench_batch.py in its own process and keeps its JSON report;
    here on the CPU, which the check itself never uses."""
    from tests.gpu.check import batching_section

    report = batching_section(quick=True, device="cpu")
    assert "error" not in report, report
    assert report["config"]["device"] == "cpu"
    assert report["max_size=8"]["requests"] == report["max_size=1"]["requests"] > 0
    assert report["throughput_ratio"] > 0
