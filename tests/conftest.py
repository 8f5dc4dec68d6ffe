"""Suite-wide pytest settings: the `cuda` marker. Tests marked so need a CUDA device and skip
cleanly without one (CI); `python -m benchmarks.gpu OUT_DIR` runs them first on a GPU machine."""


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA device (skipped without one); run on a '
                                       'GPU machine by python -m benchmarks.gpu')
