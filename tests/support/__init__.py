"""What the tests share that is not a test: rounding-error bounds, data makers, the programs the
multi-process tests launch, the proxy in front of the test S3 server, and `python -m tests.support.margins`."""
