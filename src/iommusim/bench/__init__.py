"""Benchmarks of the model against baselines measured in the same run (issue 8).

``run_benchmarks`` measures the baselines (a C program, a plain-Python radix model, a numpy fill) and each
vendor's figures through a ``Platform`` factory; ``render`` prints them as ratios with the issue's targets;
``BenchResult.to_json`` keeps every number.  ``iommusim bench`` and ``benchmarks/run_all.py`` are thin
front ends to these.
"""

from iommusim.bench.options import DEFAULT_SIZES, QUICK_SIZES, BenchOptions, make_options, parse_sizes
from iommusim.bench.report import render
from iommusim.bench.results import FIGURES, GROUPS, TARGETS, BenchResult, VendorResult
from iommusim.bench.subjects import PlatformFactory, Subject, make_subject
from iommusim.bench.suite import run_benchmarks, run_vendor
from iommusim.bench.timing import Measurement, measure, measure_call

__all__ = [
    "DEFAULT_SIZES",
    "FIGURES",
    "GROUPS",
    "QUICK_SIZES",
    "TARGETS",
    "BenchOptions",
    "BenchResult",
    "Measurement",
    "PlatformFactory",
    "Subject",
    "VendorResult",
    "make_options",
    "make_subject",
    "measure",
    "measure_call",
    "parse_sizes",
    "render",
    "run_benchmarks",
    "run_vendor",
]
