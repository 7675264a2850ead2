"""A/B comparison: suites, scoring, the sandbox, statistics, results and reports."""
