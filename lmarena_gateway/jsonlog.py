"""JSON log lines for twistd: ``twistd --logger=lmarena_gateway.jsonlog.observer ...``.

twistd's ``--logger`` wants a factory that takes no arguments, and Twisted's own
``jsonFileLogObserver`` needs a file, so this binds it to stdout. No RFC 7464 record
separator: one plain JSON object per line, which journald and log shippers take as is.
"""

from __future__ import annotations

import sys
from typing import cast

from twisted.logger import ILogObserver, jsonFileLogObserver


def observer() -> ILogObserver:
    return cast(ILogObserver, jsonFileLogObserver(sys.stdout, recordSeparator=""))
