"""Pre-merge regression gates: each audit compared with its stored baseline (``--mlrepro-baseline``).

``record`` (what a baseline holds), ``store`` (one file per test, atomic), ``compare`` (exact on the
same environment key, declared tolerances elsewhere), ``gate`` (one test's verdict and file writes).
"""
