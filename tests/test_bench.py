"""The benchmark scripts run, on the tiny model, and report what bench/RESULTS.md is made of."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def bench(script, *flags, model=("--preset", "tiny", "--resolution", "64")):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), *model, *flags],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_train_reports_every_variant_and_the_multiplied_out_step_does_less_arithmetic():
    result = bench("bench_train.py", "--steps", "1", "--warmup", "0")
    variants = {"floor", "a1111", "lora", "hypernet_layers"}
    assert set(result["seconds_per_step"]) == variants | {"hypernet"}
    assert set(result["ratios"]) == set(result["paired_ratios"]) == {f"hypernet/{name}" for name in variants}
    for low, high in result["paired_ratio_range"].values():
        assert 0 < low <= high
    flops = result["flop_ratios"]
    assert flops["hypernet/hypernet_layers"] < 1 and flops["hypernet/a1111"] < 1 < flops["hypernet/floor"]
    assert set(result["optimizer_step_seconds"]) == {"default", "fused"}


def test_bench_train_only_times_floor_and_hypernet_with_the_named_and_compiled_variants_and_pairs_them_by_round():
    result = bench(
        "bench_train.py", "--steps", "3", "--warmup", "1", "--no_flops", "--torch_compile", "--only", "a1111"
    )
    assert set(result["seconds_per_step"]) == {"floor", "hypernet", "a1111", "floor_compiled", "hypernet_compiled"}
    assert set(result["compiled_paired_ratios"]) == {
        "floor_compiled/floor",
        "hypernet_compiled/hypernet",
        "hypernet_compiled/floor_compiled",
    }
    first, steady = result["first_step_seconds"], result["seconds_per_step"]
    assert first["hypernet_compiled"] > steady["hypernet_compiled"], "the first step compiles"
    rounds = result["seconds_by_round"]
    assert all(len(times) == 3 for times in rounds.values())
    per_round = sorted(h / f for h, f in zip(rounds["hypernet"], rounds["floor"]))
    assert result["paired_ratios"]["hypernet/floor"] == pytest.approx(per_round[1], rel=0.01)
    low, high = result["paired_ratio_interval_95"]["hypernet/floor"]
    assert per_round[0] - 0.001 <= low <= high <= per_round[-1] + 0.001
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_train.py"), "--preset", "tiny", "--only", "dora"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "--only: no variant ['dora']" in out.stderr


def test_bench_generate_reports_merged_and_wrapped_hypernetworks_against_plain():
    result = bench("bench_generate.py", "--num_inference_steps", "2", "--rounds", "1", "--torch_compile")
    assert set(result["seconds_per_image"]) == {"plain", "one", "two", "one_wrapped", "plain_compiled", "one_compiled"}
    assert set(result["compiled_ratios"]) == {"plain_compiled/plain", "one_compiled/one"}
    flop_ratios = result["flop_ratios"]
    assert flop_ratios["one/plain"] == flop_ratios["two/plain"] == 1.0, "merged: the plain pipeline's arithmetic"
    assert flop_ratios["one_wrapped/plain"] > 1


def test_bench_data_reports_held_memory_caching_and_step_times():
    result = bench(
        "bench_data.py",
        "--images",
        "24",
        "--large",
        "96",
        "--train_steps",
        "2",
        "--steps",
        "2",
        "--rounds",
        "1",
        model=(),
    )
    assert set(result["held_mib"]) == {"24x1", "24x2", "96x1", "96x2"} and result["held_mib"]["24x2"] > 0
    assert result["store_mib"]["96"] == pytest.approx(4 * result["store_mib"]["24"], rel=0.05)
    assert result["warm_encoded"] == [0, 0] and set(result["caching_seconds"]) == {"1", "2", "warm"}
    assert set(result["step_ms"]) == {"store", "memory", "on_the_fly"} and result["store/memory"] > 0
    assert "skipped" in result["memory_limit"] or set(result["memory_limit"]) >= {"finished", "limit_mib"}


def test_bench_style_measures_every_variant_at_every_step_count_for_both_prompt_groups():
    result = bench(
        "bench_style.py", "--at", "0,2", "--seeds", "1", "--only", "relu,lora", "--hypernetwork", "relu", "1,4,1", "1e-3",
        model=(),
    )  # fmt: skip
    assert set(result["style"]) == {"relu", "lora", "relu 1,4,1 @1e-3"}
    for variant in result["style"].values():
        assert set(variant) == {"0", "2"}
        for measured in variant.values():
            assert set(measured) == {"in_captions", "not_in_captions"}
            assert all(0 <= distance <= 255 * 3**0.5 for distance in measured.values())
    assert result["style"]["lora"]["0"] == result["base_style"], "LoRA starts at B = 0: the base model's images"
    assert result["trainable_parameters"]["relu"] > result["trainable_parameters"]["lora"] > 0
    widths = (32, 64, 96)  # demo-sd's; a module pair per width, each w -> 4w -> w with biases
    assert result["trainable_parameters"]["relu 1,4,1 @1e-3"] == sum(2 * (8 * w * w + 5 * w) for w in widths)


PEAK = """
import json, sys, torch
from common import PeakMemory

def step():
    return [torch.ones(1 << 20) for _ in range(64)]  # 64 blocks of 4 MiB, kept in glibc's heap when freed
for _ in range(2):
    activations = step()
    del activations
with PeakMemory("cpu") as peak:
    activations = step()
print(json.dumps(peak.peak_above_start))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc/self")
def test_cpu_peak_memory_counts_a_step_whose_memory_was_freed_by_the_step_before():
    out = subprocess.run(
        [sys.executable, "-c", PEAK], capture_output=True, text=True, check=True, cwd=os.path.join(ROOT, "bench")
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) >= 0.9 * 256 * 2**20


def test_bench_prompts_memory_does_not_grow_with_repeated_tags_and_refusals_cost_less_than_a_run():
    cases = ["one_tag", "32_tags", "10_mb_line"]
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_prompts.py"), "--layer_width", "64", "--only", *cases],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    peak, codes = result["peak_mib"], result["exit_codes"]
    assert codes == {"plain": 0, "one_tag": 0, "32_tags": 0, "10_mb_line": 2}
    assert result["hypernetwork_file_mib"] > 40
    # A copy of the 42 MiB file per repeat would add 31 x 42 MiB to the one tag's peak.
    assert peak["32_tags"] - peak["one_tag"] < result["hypernetwork_file_mib"]
    assert peak["10_mb_line"] < peak["plain"]
