import llm_tally


def test_all_exports_exist_and_nothing_else_is_public() -> None:
    exported = set(llm_tally.__all__)
    public = {name for name in dir(llm_tally) if not name.startswith("_")} - {
        # subpackages Python adds as attributes on import
        "integrations",
        "storage",
        "demo",
        "middleware",
        "web",
        "cli",  # the command line's module, imported by tests that run it
    }
    assert public == exported - {"__version__"}
    for name in exported:
        assert hasattr(llm_tally, name), name
