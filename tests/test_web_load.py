"""`dforge serve` under load on loopback: 20 generation requests at once through gradio_client all complete
(none lost, each with its own seeds), and the server still answers after; bounded in count and time
(a tiny model, 3 steps, plain pictures)."""
from __future__ import annotations

import time
import urllib.request

from test_web import serving, tiny_run  # noqa: F401 (fixtures)

REQUESTS = 20
BOUND_S = 120            # all of them, on a loaded 2-core machine (about 10 s when idle)


def test_twenty_concurrent_generations_all_complete(tiny_run, tmp_path):  # noqa: F811
    from gradio_client import Client

    with serving([tiny_run], tmp_path, max_queue=32) as (_, url):
        client = Client(url, verbose=False)
        start = time.time()
        jobs = [client.submit(str(tiny_run), "euler", 3, 100 * i, 2, "none", 1, "", "", False, api_name="/generate")
                for i in range(REQUESTS)]
        results = [job.result(timeout=BOUND_S) for job in jobs]
        seconds = time.time() - start
        assert seconds < BOUND_S
        assert len(results) == REQUESTS
        for i, (status, _strip, grid, trajectory, files) in enumerate(results):
            assert status.startswith(f"2 images, euler 3 steps, seeds {100 * i}..{100 * i + 1}:"), status
            assert grid and trajectory and len(files) == 2
        # the server is up: the page answers, and one more request goes through
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b"Diffusion Forge" in page.read()
        status = client.predict(str(tiny_run), "heun", 2, 7, 1, "none", 1, "", "", False, api_name="/generate")[0]
        assert status.startswith("1 image, heun 2 steps, seeds 7..7")
