"""``python -m ssl_kit.bench``: benchmark suites of ssl_kit methods, their results store and reports."""
