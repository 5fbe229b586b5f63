"""Shared machinery of fastdpo's benchmarks: problems, implementations, measurement, reports.

Scripts in ``benchmarks/`` import it as ``benchlib`` (their directory is on ``sys.path``); so do the
pytest-benchmark tests there. It is not installed with fastdpo.
"""
