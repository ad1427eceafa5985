"""One module per instrumented LLM client library."""
