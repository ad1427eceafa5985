"""gunicorn settings for the tests' servers (``--config python:tests.gunicorn_conf``).

The master imports the heavy libraries once, so each forked worker starts in a fraction of
the time; the app itself, and its Tally, are still created in each worker.
"""

import flask  # noqa: F401
import openai  # noqa: F401

import llm_tally  # noqa: F401

# Its default path is shared by every gunicorn on the machine.
control_socket_disable = True
