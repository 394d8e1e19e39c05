"""pytest-benchmark glue: each benchmark module declares RESULTS_NAME and PLOT (plot_results keywords); the
`record` fixture collects one flat dict per measurement and writes benchmarks/results/<RESULTS_NAME>.json and
its PNG when the module's benchmarks are done."""

import pytest
from record import plot_results, save_results


@pytest.fixture(scope="module")
def record(request):
    rows: list[dict] = []
    yield rows.append
    if rows:
        path = save_results(request.module.RESULTS_NAME, rows, getattr(request.module, "META", None))
        plot_results(path, **request.module.PLOT)
