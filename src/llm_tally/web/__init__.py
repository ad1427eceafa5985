"""The ``/llm-usage`` endpoint (JSON API) and the framework wiring behind ``Tally.init_app``."""
