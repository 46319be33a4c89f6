"""The device's two ceilings, measured: copy bandwidth and the bf16 matrix-product rate.

``python bench/gpu/ceilings.py --json PATH``. CUDA: a 2 GiB device-to-device copy (bytes read
plus written over the median time) and an 8192^3 bf16 product on random data (never zeros:
they run faster). The CPU dry run: a 64 MiB copy and a 512^3 fp32 product.
"""

from __future__ import annotations

import argparse

from timing import StageResult, bench_device, copy_rate, gemm_rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="where to write the result")
    args = parser.parse_args(argv)
    device = bench_device()
    result = StageResult(args.json)
    copy = copy_rate(device)
    result.data["copy"] = copy
    result.data["copy_gb_per_s"] = copy["bytes_per_s"] / 1e9
    result.save()
    gemm = gemm_rate(device)
    result.data["gemm"] = gemm
    result.data["gemm_tflop_per_s"] = gemm["flop_per_s"] / 1e12
    result.save()
    print(
        f"ceilings on {device}: copy {result.data['copy_gb_per_s']:.0f} GB/s (read + write), "
        f"{gemm['dtype']} GEMM {gemm['size']}^3 {result.data['gemm_tflop_per_s']:.1f} TFLOP/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
