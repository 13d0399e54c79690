"""Peak RSS growth of one benchmark step, in a fresh process (run by ``measure.subprocess_peak_mb``).

    python -m nonlocal_ext.benchmark._memory_child '{"case": {...}, "runner": "chunked"}'

Prints one JSON line: ``{"peak_mb": float}``, or ``{"error": message}`` when the step raised.
"""

from __future__ import annotations

import json
import sys


def main(payload: str) -> None:
    from .cases import Case
    from .measure import peak_rss_growth_mb
    from .runners import all_runners

    import torch

    request = json.loads(payload)
    torch.set_num_threads(request.get("threads", torch.get_num_threads()))  # as in the parent
    fields = dict(request["case"])
    fields["pass_"] = fields.pop("pass")
    case = Case(**fields)
    try:
        result = {"peak_mb": peak_rss_growth_mb(case, all_runners()[request["runner"]])}
    except Exception as error:  # noqa: BLE001 - reported as the row's error
        result = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
