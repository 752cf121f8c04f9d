"""The CPU kernels as machines without AVX-512 build them.

The extension is compiled with `-march=native`, so on the AVX-512 machines the other tests run
on, the AVX2 and plain C++ paths of the kernels (int8 and nibble conversion, float16 scales,
attention, the fused ops, the GGUF dequantizers) are never compiled. Here the extension is built again for Haswell
(AVX2, FMA, F16C) and for baseline x86-64, in a fresh `$SHARDLINE_HOME`, and the kernel tests run
against each build: packed GEMMs (GGUF K-quant panels with float32 scales included) equal to
float32 panels bit for bit, the decoder loop equal to
the Python layers, paged attention and the fused ops equal to their references, GGUF blocks turned
into gguf-py's `dequantize` values bit for bit (the AVX2 build's vector K-quant / Q8_0 dequantizers,
the baseline build's scalar ones), the GGUF GEMM equal to dequantize + mm, and the int8-activation
GEMM equal to its integer definition (AVX2's maddubs, the baseline's plain loops).
"""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 -march targets"
    ),
]

ROOT = pathlib.Path(__file__).resolve().parents[2]
TESTS = [
    "tests/model/test_packed_linear.py",
    # Not its TP=2 Engine test: its worker processes would build the extension for this machine.
    *(f"tests/model/test_packed_kquants.py::{name}" for name in (
        "test_scaled_blocks_are_gguf_py_dequantize_bit_for_bit",
        "test_scaled_blocks_compute_what_float32_panels_do_bit_for_bit",
        "test_fused_weights_of_mixed_types_take_one_layout",
        "test_packing_a_model_in_row_slices_gives_the_whole_weights_panels",
        "test_a_q4_k_m_like_llama_gguf_packed_equals_transformers",
        "test_engine_decodes_a_q4_k_m_like_gguf_as_transformers",  # in-process worker
    )),
    "tests/model/test_cpu_decoder.py",
    "tests/model/test_paged_decode_kernel.py",
    "tests/model/test_cpu_ops.py",
    "tests/model/test_gguf_weights.py::test_kernel_values_are_gguf_py_dequantize_bit_for_bit",
    "tests/model/test_q8_linear.py::test_gemm_is_its_integer_definition",
    "tests/model/test_q8_linear.py::test_two_scale_blocks_are_their_definition",
    *(f"tests/model/test_q8_linear.py::{name}" for name in (
        "test_kquants_at_file_size_are_their_integer_definition",
        "test_q4_k_results_equal_the_float_scale_form_bit_for_bit",
        "test_fused_weights_keep_each_parts_form",
        "test_parts_off_group_boundaries_or_of_other_types_take_the_common_form",
        "test_column_shards_of_kquant_parts_are_their_definition",
        "test_an_arena_holds_what_pack_and_from_gguf_make_one_after_another",
    )),
    "tests/model/test_gguf_weights.py::test_gemm_equals_dequantize_and_mm_for_1_to_256_rows",
    "tests/model/test_gguf_weights.py::test_gemm_rows_equal_one_row_gemms_bit_for_bit",
    "tests/model/test_gguf_weights.py::test_parts_write_their_rows_and_column_shards_take_whole_blocks",
]
RUN = """
import sys
from shardline.model import paged_decode
paged_decode.CFLAGS = ("-O3", "-march={arch}", "-fopenmp")
assert paged_decode.KERNEL.load()
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


@pytest.mark.parametrize("arch", ["haswell", "x86-64"])
def test_kernels_built_without_avx512_pass_the_kernel_tests(
    arch: str, tmp_path: pathlib.Path
) -> None:
    env = {**os.environ, "SHARDLINE_HOME": str(tmp_path), "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-c", RUN.format(arch=arch), *TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    builds = list(tmp_path.glob("torch_extensions/*/build.ninja"))
    assert builds and all(f"-march={arch}" in build.read_text() for build in builds)
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]
