"""Which arithmetic a run computes in: bf16 autocast only where asked for, or where native when
the preset says ``bf16-native`` (issue 23's demo on an AVX2 host: emulated bf16 at a tenth of fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxr_miner.miner.training import PRECISIONS, TrainConfig, autocast, native_bf16, preset, uses_bf16
from cxr_miner.storage.vocab.errors import SettingError

CPU = torch.device("cpu")


def cpuinfo_has_native_bf16() -> bool:
    """The kernel's own word on the CPU: the avx512_bf16 or amx_tile flag of /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_tile"} & set(line.split(":", 1)[1].split()))
    return False


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_native_bf16_agrees_with_the_cpu_flags():
    assert native_bf16(CPU) == cpuinfo_has_native_bf16()


def test_each_precision_on_the_cpu():
    assert uses_bf16(CPU, "bf16") and not uses_bf16(CPU, "fp32") and not uses_bf16(CPU, "auto")
    assert uses_bf16(CPU, "bf16-native") == native_bf16(CPU)
    assert uses_bf16(torch.device("cuda"), "bf16-native") and uses_bf16(torch.device("cuda"), "auto")
    assert not uses_bf16(torch.device("cuda"), "fp32")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_autocast_computes_as_uses_bf16_says(precision):
    x = torch.randn(4, 8)
    with autocast(CPU, precision):
        y = torch.nn.functional.linear(x, torch.randn(3, 8))
    assert y.dtype == (torch.bfloat16 if uses_bf16(CPU, precision) else torch.float32)


def test_the_demo_preset_asks_for_bf16_only_where_native():
    assert preset("cpu-demo").precision == "bf16-native"


def test_an_unknown_precision_is_refused_with_the_known_ones():
    with pytest.raises(SettingError, match="bf16-native"):
        TrainConfig(precision="fp16")
