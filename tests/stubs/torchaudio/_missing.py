def missing_in(module: str):
    """A module-level ``__getattr__`` that refuses every name of ``module``."""
    def __getattr__(name: str):
        raise AttributeError(
            f"{module}.{name} is not available: this torchaudio is the import stub in tests/stubs, used by "
            "`make test-upstream` because torchaudio has no wheel for torch 2.14.1; audio nodes need a real "
            "torchaudio (a torch release that has one)")
    return __getattr__
