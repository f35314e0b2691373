"""NAS-Bench-201: results lookup, query-based search strategies and the search protocol.

``open_benchmark(path)`` gives a :class:`Nb201Benchmark` (a CSV table or the official API
files); ``run_query_search(name, bench, budget, seed)`` runs a query-based strategy under
the no-leakage protocol (search sees validation accuracy only).
"""

from diffnas.nasbench.oracle import BudgetExhausted, QueryOracle
from diffnas.nasbench.runner import (
    SearchOutcome,
    describe_cell,
    make_oracle,
    paired_comparison,
    run_query_search,
)
from diffnas.nasbench.strategies import (
    QUERY_STRATEGIES,
    QueryStrategy,
    create_query_strategy,
    list_query_strategies,
    register_query_strategy,
)
from diffnas.nasbench.table import (
    COLUMNS,
    REPORT_METRICS,
    SEARCH_METRIC,
    TEST_METRICS,
    ApiNb201Table,
    CsvNb201Table,
    Nb201Benchmark,
    open_benchmark,
)

__all__ = [
    "COLUMNS", "QUERY_STRATEGIES", "REPORT_METRICS", "SEARCH_METRIC", "TEST_METRICS",
    "ApiNb201Table", "BudgetExhausted", "CsvNb201Table", "Nb201Benchmark", "QueryOracle",
    "QueryStrategy", "SearchOutcome", "create_query_strategy", "describe_cell",
    "list_query_strategies", "make_oracle", "open_benchmark", "paired_comparison",
    "register_query_strategy", "run_query_search",
]
