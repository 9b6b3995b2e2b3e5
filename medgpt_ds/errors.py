"""The one exception type for user mistakes (bad flags, data, configs, checkpoints, paths).

Library code raises ``UserError`` (or a subclass) with one line naming the file, line and field or
the flag; it never calls ``SystemExit``. Only ``medgpt_ds.cli.main`` and each tool's ``main`` turn
it into ``error: ...`` on stderr and exit status 2 (the traceback with ``--debug`` or
``MEDGPT_DEBUG=1``).
"""
from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; the message is shown as ``error: <message>``."""
